"""``loadtest thrash``: more adapters than the slots that hold them, under a skewed mix.

Both thrash scenarios are measured inside compare's run (``loadtest.compare.run``), beside the
all-resident mode they are judged against: the same vLLM, the same request sequence, the same moment.
This package holds what is theirs: the gateway that switches between all resident and thrashing
(``run``), their ratios and targets in the report (``report``) and the command (``cli``).
"""
