"""The project's scientific studies, simulators and probes (speed benchmarks are in bench/); results in results/.

Run one from the checkout as a script (``python3 studies/study_espo.py``) or import it from the repository root
(``from studies import study_espo``); either way it uses the checkout's espo, not an installed one.
"""
