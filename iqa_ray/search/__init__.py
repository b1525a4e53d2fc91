"""Search: studies as data, searchers, schedulers, the Tuner and the launcher."""
