"""Input readers for mva-build. Each yields row blocks of one input in its own feature space.

A reader (:class:`data.convert.base.Source`) exposes ``name`` (for error messages), ``obs`` (per-cell
table, index = cell id, with boolean ``mask_rna`` / ``mask_atac``), ``features`` ({"rna": var df or None,
"atac": var df or None}) and ``blocks(block_size)`` yielding ``(start, rna_csr | None, atac_csr | None)``
for consecutive cells of ``obs``. ``open_input(InputConfig)`` picks the reader for a kind.
"""

from data.convert.base import Source, open_input

__all__ = ["Source", "open_input"]
