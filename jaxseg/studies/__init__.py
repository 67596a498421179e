"""Studies that orchestrate many runs (compare, gan_augment); nothing in jaxseg imports them."""
