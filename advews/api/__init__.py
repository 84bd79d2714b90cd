"""The Python API: what the CLIs do, as functions a notebook or script calls (``advews.train``,
``advews.load_model``, ``advews.evaluate``, ``advews.analyze_subnets``). The CLIs parse flags and
call these, so both give the same numbers, JSON and one-line errors. Nothing is imported here:
``advews.api.options`` must stay torch-free for ``advews-eval --help``."""
