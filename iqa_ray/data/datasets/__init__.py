"""Adapters that read real IQA datasets, in the layouts of their original downloads, into one table.

Every adapter returns a :class:`pandas.DataFrame` with one row per image and these columns:

==========  =============================================================================
column      meaning
==========  =============================================================================
image_id    str, unique: the file name relative to the image folder (``/`` separators)
path        str, absolute path of the image file
mos         float, the score normalised to 0-100 where higher is better (table below)
mos_raw     float, the score exactly as in the label file
split       ``"train"``, ``"val"`` or ``"test"``
group       str, content group used for splitting (the image itself when there is none)
...         dataset-specific extras (``distortion``, ``level``, ``ref_img``, ``prompt``, ...)
==========  =============================================================================

``df.attrs`` holds ``dataset`` (canonical name), ``mos_scale`` (text of the mapping to 0-100),
``split_source`` (``"official"`` when the split comes from the data files, otherwise
``"seeded-random(seed=S, fractions=(a, b, c))"``), ``skipped`` (list of dicts with ``file``,
``row``, ``line``, ``image`` and ``reason`` for each skipped row), ``root``, ``image_dir``,
``label_file`` and ``n_rows_read``.

Where each dataset is read
--------------------------
One module per dataset, each saying in its docstring which files of the original download it reads:

=================  ==============================================  ==============================
name               dataset                                         module
=================  ==============================================  ==============================
``koniq10k``       KonIQ-10k                                       :mod:`.koniq10k`
``kadid10k``       KADID-10k                                       :mod:`.kadid10k`
``spaq``           SPAQ                                            :mod:`.spaq`
``livec``          LIVE Challenge                                  :mod:`.livec`
``agiqa3k``        AGIQA-3K (a declared :class:`~.layout.Layout`)  :mod:`.agiqa3k`
``csv``            any folder + CSV whose columns the user names   :mod:`.generic_csv`
=================  ==============================================  ==============================

They share one reader: :mod:`.label_files` reads label files (CSV, Excel) with row and line numbers
and locates the files; :mod:`.table` checks the rows, maps scores to 0-100, draws the split and builds
the table. :mod:`.layout` declares a dataset as data (:class:`~.layout.Layout`, :func:`~.layout.read_layout`);
:mod:`.registry` holds the adapters by name (``ADAPTERS``, aliases, ``register_layout``) and
:func:`~.registry.load_iqa_dataset`, the entry point.

Normalisation to 0-100 (higher is better)
-----------------------------------------
=============  ====================  ===========================  =============================
dataset        label column          raw range (checked)          mapping to ``mos``
=============  ====================  ===========================  =============================
koniq10k       ``MOS`` (default)     1-5                          ``(MOS - 1) / 4 * 100``
koniq10k       ``MOS_zscore``        0-100                        as is
koniq10k       sets-file ``MOS``     0-100                        as is (only sets file present)
kadid10k       ``dmos``              1-5                          ``(dmos - 1) / 4 * 100``
spaq           ``MOS``               0-100                        as is
livec          ``AllMOS_release``    0-100                        as is
agiqa3k        ``mos_quality``       0-5                          ``mos_quality * 20``
csv            ``mos_col``           ``mos_range=(lo, hi)``       ``(x - lo) / (hi - lo) * 100``,
                                                                  or ``(hi - x) / (hi - lo) * 100``
                                                                  when ``higher_is_better=False``
=============  ====================  ===========================  =============================

A raw value outside its range is treated as a bad label (usually the wrong column or file).

Splits
------
KonIQ-10k's official split is used when ``koniq10k_distributions_sets.csv`` is present (and
``use_official_split`` is true) and the generic adapter uses ``split_col`` when given; everything
else gets a seeded split grouped by ``group`` (:func:`~.table.seeded_group_split`): whole groups go to
one split, so no reference image (KADID-10k) or prompt (AGIQA-3K) is in two splits.

Errors
------
Problems raise :class:`~iqa_ray.core.errors.DatasetError` naming the file, the row and what is
valid. Row problems (a MOS that is empty, not a number or out of range, a duplicated image name,
a missing image file, an unknown split value and, with ``check_images=True``, an image file that
is empty, not an image or truncated) are all found before the split is drawn and raised together,
in one error that names the first 20 and counts the rest; or they are skipped with
``on_error="skip"``: left out of every split, listed in ``df.attrs["skipped"]``, and a warning
gives their number. For a duplicated name the first row is kept. Structural problems (missing
root, label file, image folder or columns, unreadable label files, nothing left to load) always
raise. Images are not decoded here (``check_images`` reads headers, and decodes only a JPEG
without its end marker or a format other than JPEG and PNG: :mod:`.image_check`).
"""
