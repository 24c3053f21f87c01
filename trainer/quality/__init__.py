"""Quality harness: our MultiVI against the reference (scvi-tools MULTIVI) on real paired data.

``scenario`` hides one modality for part of the paired cells (seeded), ``data`` reads the paired
inputs, ``ours`` / ``reference`` train each side on exactly the same masked cells, ``evaluate`` runs one
evaluator over either trained module, ``metrics`` holds the metric functions and ``report`` turns runs
into a Markdown table, a JSON file and a figure. Entry point: ``scripts/bench/quality.py``.
"""
