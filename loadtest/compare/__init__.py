"""``loadtest compare``: merged serving vs adapter-only serving, on servers it starts and stops itself.

- ``run``     the modes (merged, adapter-1, adapter-N, and the thrash modes of ``loadtest.thrash``) back
              to back at each level, pooled over repeats; memory of each vLLM and of the files
- ``report``  ratios per concurrency, loads, memory, targets, plots
- ``cli``     the ``compare`` command
"""
