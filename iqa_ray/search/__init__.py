"""Search: studies as data, settings from flags, cluster start-up, searchers and schedulers, the Tuner, the
re-training of the selected configuration (refit, ``--splits``), the summary and the exports."""
