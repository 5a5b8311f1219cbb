"""Helpers the command-line tools share, none of them about the engine:

    plotting.py      matplotlib without a display, right-aligned text tables
    load_monitor.py  is anything else using the CPU while a benchmark measures?

They import nothing from kvserve, so bench, eval, trace and sim can all use them.
"""
