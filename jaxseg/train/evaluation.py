"""The evaluation primitive a training loop needs: a confusion matrix over a split, data
parallel over the mesh. Scoring finished runs, ensembles and reports is `jaxseg.evaluate`."""

from __future__ import annotations

import jax
import numpy as np
import tqdm

from jaxseg.data import pipeline
from jaxseg.train import sharding

# The val scores of segmentation and the superpixel GNN: metrics.jsonl's `eval/<key>` (and
# `eval/ema/<key>` with train.ema_decay), and what train.keep_best may name.
EVAL_KEYS = ("miou", "pixel_accuracy", "mean_dice", "mean_accuracy")


def confusion_over(eval_step, state, source, mesh, batch_size, num_classes, validate,
                   num_examples=None, keep=0, operations=(), skip_log=None, desc=None):
  """Confusion matrix over the split (summed in int64) and `keep` predictions spread evenly
  over this process's examples (consecutive video frames would show one scene `keep` times).

  `eval_step(state, batch) -> (int confusion (K, K), predictions (B, H, W))` sees global
  batches of `batch_size` sharded over `mesh`; `desc` shows a progress bar.
  """
  confusion = np.zeros((num_classes, num_classes), np.int64)
  kept = {"image": [], "label": [], "prediction": []}
  local = batch_size // jax.process_count()
  n = len(source) if num_examples is None else min(num_examples, len(source))
  mine = range(jax.process_index(), n, jax.process_count())  # eval_batches' share
  wanted = {mine[i * len(mine) // keep] for i in range(keep)} if keep and len(mine) else set()
  bar = tqdm.tqdm(total=len(mine), desc=desc, unit="image", dynamic_ncols=True,
                  mininterval=1.0, disable=desc is None or jax.process_index() != 0)
  for batch in pipeline.eval_batches(source, local, num_examples, validate,
                                     jax.process_index(), jax.process_count(), operations,
                                     skip_log):
    index = batch.pop("index")
    cm, predictions = eval_step(state, sharding.put_batch(batch, mesh))
    confusion += np.asarray(jax.device_get(cm), np.int64)
    bar.update(int((index >= 0).sum()))
    rows = [i for i in range(local) if index[i] in wanted]
    if rows and len(kept["image"]) < keep:
      # This process's rows only: the global array spans every host's batch.
      shards = sorted(predictions.addressable_shards, key=lambda s: s.index[0].start or 0)
      predictions = np.concatenate([np.asarray(s.data) for s in shards])
      for i in rows[:keep - len(kept["image"])]:
        kept["image"].append(batch["image"][i])
        kept["label"].append(batch["label"][i])
        kept["prediction"].append(predictions[i])
  bar.close()
  return confusion, kept
