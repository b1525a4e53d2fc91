"""The core: what every layer above builds on and nothing here imports from above.

Options and their validation, the shared error types, atomic and safe file I/O, seeding and the
default device, metrics, default paths, trial selection, plug-ins and progress bars.
"""
