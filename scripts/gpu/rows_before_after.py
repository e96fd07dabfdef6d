"""Decode at 1-8 rows with the 2-4-row configurations of before 2026-11-22's int8 sweep (gemvT,
one program a row, everywhere) and with the current ones, in one process each way: the
end-to-end check of the ROWS=2,4 sweep. Usage: python scripts/gpu/rows_before_after.py before|after
[bench decode options]"""

from __future__ import annotations

import sys

from driftwood.cli.main import main
from driftwood.model.cuda import kernels as K

if sys.argv[1] == "before":
    for fmt in (K.Q4_0, K.Q8_0):
        K.CONFIGS.pop((fmt, 2), None)
        K.CONFIGS[(fmt, 4)] = ("gemvT", 4, 4)
sys.exit(main(["bench", "decode", *sys.argv[2:]]))
