"""Offline text sources.

* :func:`builtin_text`: the prose of CPython's own documentation topics
  (``pydoc_data.topics``, shipped with every Python), about 0.5 MB of English — the
  default calibration and demo text when no file is given. It is technical English, not
  encyclopedic: pass ``--calib``/``--text`` for anything you want to report.
* :func:`find_wikitext`: WikiText-2 (v1) when the project's ``../shared/data`` sits beside
  the checkout (benchmarks use it; tests never depend on it).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional


def builtin_text() -> str:
    from pydoc_data.topics import topics

    parts = [topics[k] for k in sorted(topics)]
    text = "\n\n".join(parts)
    return re.sub(r"[ \t]+\n", "\n", text)


def find_wikitext(split: str = "test") -> Optional[Path]:
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *here.parents]:
        p = base.parent / "shared" / "data" / "wikitext-2" / f"{split}.txt"
        if p.is_file():
            return p
    return None
