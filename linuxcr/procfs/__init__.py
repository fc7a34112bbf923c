"""Pure parsers of /proc files, plus thin read_*(pid) helpers.

Parsers take file contents (str or bytes) and return frozen dataclasses; the
read_* helpers let FileNotFoundError / ProcessLookupError / PermissionError
through unchanged for callers to translate.
"""

from .attrs import read_cap_last_cap, read_oom_score_adj, thread_tids
from .auxv import parse_auxv, read_auxv
from .fdinfo import FdInfo, fd_links, list_fds, parse_fdinfo, read_fd_link, read_fdinfo
from .maps import MapEntry, SmapsEntry, parse_maps, parse_maps_line, parse_smaps, read_maps, read_smaps
from .pagemap import PagemapReader, page_runs, read_pagemap, split_runs
from .stat import ProcStat, parse_stat, read_stat
from .status import ProcStatus, parse_status, read_status

__all__ = [
    "FdInfo",
    "MapEntry",
    "PagemapReader",
    "ProcStat",
    "ProcStatus",
    "SmapsEntry",
    "fd_links",
    "list_fds",
    "page_runs",
    "parse_auxv",
    "read_cap_last_cap",
    "read_oom_score_adj",
    "thread_tids",
    "parse_fdinfo",
    "parse_maps",
    "parse_maps_line",
    "parse_smaps",
    "parse_stat",
    "parse_status",
    "read_auxv",
    "read_fd_link",
    "read_fdinfo",
    "read_maps",
    "read_pagemap",
    "read_smaps",
    "read_stat",
    "read_status",
    "split_runs",
]
