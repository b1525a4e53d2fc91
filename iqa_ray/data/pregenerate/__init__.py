"""Pre-generation: references -> distorted versions -> parquet shards, once, on Ray Data.

Distorting images on the fly repeats the same work every epoch of every trial; the seeds'
users split generation from training (seed 003) and so do we. A generated dataset is a folder::

    <out>/<source>-<strength>-<hash>/
        manifest.json           generating config + hash, references with licences, split,
                                severity table, shard list, schema, git revision
        processing_stats.json   processed, failed (with path and error), per-type counts,
                                elapsed, images/s
        shards/shard-00000.parquet ...   one row per image (PNG bytes + labels)

How it runs. The driver lists the references and plans the work: each photo is scaled so
its short side is at most ``max_short_side``, cut into a grid of non-overlapping
``crop_size`` crops, and the crops are grouped into *work units* of a few crops of the same
photo. Ray Data maps a function over the units, one block per unit, across every CPU of the
cluster. A unit decodes its photo once, writes its own shard atomically and returns only a
small stats row, so image bytes never travel back through the driver. Blocks are sized to
units of real work (tens of images) because a block per single image costs more in
scheduling than the work it holds.

Three passes: a *decode check* decodes every photo once, so that corrupt files are left out
before the split by photo is drawn; a *calibration* pass distorts the centre crop of every
*training* photo at a grid of levels for every type and averages the full-reference label,
giving the content-free ``severity`` table (validation and test photos take no part in it, so
nothing about them shapes the labels a model is trained on); the *generation* pass then writes
both labels for every image of every split.

Crash safety. Work happens in ``<out>/.partial-<name>/``. Each shard and its stats sidecar are
written atomically, so a killed run leaves only complete shards, and a re-run with the same
config skips the units already done. The folder is renamed to its final name only after the
manifest is written: a folder without the ``.partial-`` prefix is always complete.

Modules, in the order of a run: :mod:`.run` (:func:`~.run.pregenerate`, the entry point: reuse, lock,
progress), :mod:`.config` (:class:`~.config.PregenConfig`), :mod:`.plan` (references, crop boxes, the
split by photo, crop tasks and work units), :mod:`.generate` (the three passes, the per-unit work and
the engines that run it: a local loop or Ray Data) and :mod:`.store` (shards, schema, manifest,
fingerprint, lock, and reading a finished dataset back).
"""
