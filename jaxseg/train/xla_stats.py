"""What XLA knows about a compiled step: its FLOPs and the memory its buffers take.

Both come from the compiled program itself (cost analysis and buffer assignment), so they are
the same on every run and exist on CPU too, where no allocator reports a peak. For a program
partitioned over a mesh they are per device.
"""

from __future__ import annotations

from typing import Any, Callable


def flops(cost) -> float | None:
  """The 'flops' entry of a (compiled or lowered) cost analysis, which may be a list."""
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - donated (aliased) buffers: the step's peak."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def compile_with_stats(jitted, *args) -> tuple[Callable, dict[str, Any]]:
  """(the compiled step for these argument shapes and shardings, {"flops", "peak_bytes"}).

  Calling the returned executable instead of `jitted` spends no second compilation on the
  statistics.
  """
  compiled = jitted.lower(*args).compile()
  return compiled, {"flops": flops(compiled.cost_analysis()), "peak_bytes": peak_bytes(compiled)}
