"""Dataset-scale evaluation: human-attention rank correlation (``human_attention``), words
by part of speech (``pos``), failure prediction (``failure``), the methods run per item
(``methods``), the resumable run store (``runstore``), item evaluation (``runner``) and the
results document (``summary``).

Submodules are imported where they are used; this package imports nothing heavy.
"""

from __future__ import annotations
