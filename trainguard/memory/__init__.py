"""Device memory: caps (``--memory-budget``), measurement, prediction and the micro-batch search.

* :mod:`~trainguard.memory.sizes`: ``3.5GiB`` <-> bytes (no torch import; the CLI uses it).
* :mod:`~trainguard.memory.tracker`: live tensor bytes counted by a dispatch mode; on CPU it
  simulates a device of a given size and raises ``torch.OutOfMemoryError`` where a GPU would.
* :mod:`~trainguard.memory.meter`: one interface over CUDA's allocator statistics and the tracker,
  and the cap itself (``set_per_process_memory_fraction`` on CUDA).
* :mod:`~trainguard.memory.trial`: real forward/backward/optimizer steps on a worst-case batch,
  leaving model, optimizer and RNG as they were; :mod:`~trainguard.memory.search` finds the
  largest micro-batch that fits in at most 12 of them.
* :mod:`~trainguard.memory.predict`: the same step on fake tensors (no compute, no device), for
  a card that is not there.
* :mod:`~trainguard.memory.autoconfig`: ``trainguard autoconfig`` and ``micro_batch_size: auto``.
"""
