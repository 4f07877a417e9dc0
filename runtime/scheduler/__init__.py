"""The scheduler: continuous batching over one ModelRunner, in parts.

    scheduler.py  Scheduler: the loop (``step``) and requests in and out
    batching.py   admission (lpm/fcfs, chunked prefill) and the ForwardBatch
    kv.py         KVBook: free slots, reservations, table rows, prefix-cache locks
    grammar.py    grammar masks (on a thread), jump-forward, budget closing
    output.py     logprobs, sampling, stop checks, finishing
    images.py     image embeddings spliced into a step's input embeddings

The life of a request, and who holds its KV slots and its table row:

    add()      queued (waiting)      no slots, no row
      |  admit: longest cached prefix matched and locked, KV for
      |         prompt + max_new_tokens reserved, a row taken
      v
    prefill    running, one chunk    row [0, tree_len): slots lent by the cache
      | (chunks)   per step          (locked); [tree_len, num_computed): the
      |                              request's own, taken from its reservation.
      |          after each chunk:   the cache adopts what was computed; the
      |                              row points at the cache's slots, the lock
      |                              moves down, duplicates go back to the pool
      v
    decode     running, one token    one more own slot per step
      |          per step
      v
    finished   (stop, length,        release: the cache adopts the computed KV
    / aborted   abort at any point)  (frees what it already had), the lock and
                                     the row are given back, and what is left
                                     of the reservation

Slots are taken from the pool (``SlotAllocator``) only for tokens computed in
a step; the prefix cache frees slots back to the pool when it evicts or gets
duplicates. The runner owns the device copy of the table and applies each
step's writes (``ForwardBatch``) before the model runs.
"""

from __future__ import annotations

from plait.runtime.scheduler.scheduler import Scheduler

__all__ = ["Scheduler"]
