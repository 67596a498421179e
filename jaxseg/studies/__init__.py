"""Studies: many runs orchestrated into one answer; the library never imports them."""
