"""Synthetic image distortions, as pure functions of ``(image, level, rng)``.

Design
------
Every distortion type is a plain function ``fn(image, level, rng) -> image``:

* ``image`` is an RGB ``uint8`` array of shape ``(H, W, 3)``. It is never modified; a new
  ``uint8`` array of the same shape is returned.
* ``level`` is a float in ``[0, 1]``: 0 is the identity (or as near to it as the codec allows)
  and 1 is a very strong distortion. Levels outside ``[0, 1]`` (or NaN) raise ``ValueError``.
* ``rng`` is a ``numpy.random.Generator``. It is the only source of randomness, so the output is
  a deterministic function of the image, the level and the generator's state. Types that draw
  from it (noise values, blur angle) draw the same amount whatever the level, so one seed gives
  the same noise pattern or angle at every level and a stronger level is a stronger version of
  the same distortion.

A ``level`` is *not* comparable across types (a blur at 0.5 is not as bad as a JPEG at 0.5); the
training label is a full-reference score computed against the reference afterwards (see
:mod:`iqa_ray.data.labels`). The level->parameter mappings below were calibrated on 160x160
centre crops of scikit-image's photos so that the label (``100 * SSIM``) is 95-100 at level 0,
falls as the level grows, and ends in a broad part of the label range at level 1 (mean label at
level 1 is roughly 33-75 depending on the type; ``saturation`` is the mild exception at about
85, because removing colour leaves the structure intact). Most mappings are powers of the level
(``L ** 1.5`` and the like) so that the label falls roughly evenly instead of collapsing at the
first step, and all are continuous in the level or as fine as an integer parameter allows.

Caveats on monotonicity: the label falls strictly with level at well-separated levels (0.1, 0.3,
0.5, 0.7, 0.9) on natural photos, which the tests check. Between very close levels an integer
parameter (codec quality, number of quantisation values) can give a tie; JPEG 2000 gives ties at
small ratios on very compressible images (the lossless file already fits the budget); and grid
or bin aliasing on strongly periodic textures (a brick wall) can make ``pixelation``,
``resample_nearest`` or ``color_quantization`` briefly non-monotone in the label.

The types are registered, with a human-readable description of the parameter at a level, in the
plain dict :data:`~.registry.DISTORTIONS`; :func:`~.registry.apply_distortion` validates the input and
dispatches by name. On a 160x160 image a call takes at most about 20 ms (JPEG 2000, the slowest, 8-20 ms;
WebP 3-6 ms; the rest about 1 ms) using PIL, OpenCV and NumPy.

Types and level->parameter mappings (``L`` is the level)
--------------------------------------------------------

====================== ============================================================================
Type                   Parameter at level ``L``
====================== ============================================================================
``gaussian_blur``      Gaussian kernel, ``sigma = 5 * L ** 1.5`` px (0 .. 5)
``motion_blur``        anti-aliased line kernel of length ``24 * L ** 1.3`` px (0 .. 24), angle
                       uniform in ``[0, 180)`` degrees drawn from ``rng``
``gaussian_noise``     additive i.i.d. Gaussian noise per pixel and channel,
                       ``sigma = 30 * L ** 1.5`` on the 0-255 scale (0 .. 30)
``impulse_noise``      salt & pepper: a fraction ``0.05 * L ** 1.5`` of pixels (0 .. 5 %) set to
                       black or white (50/50, all three channels)
``jpeg``               PIL JPEG, ``quality = round(2 * 50 ** (1 - L))`` (100 .. 2; libjpeg's
                       quantisation tables are already at their coarsest at quality 2)
``webp``               PIL lossy WebP, ``quality = round(100 * (1 - L) ** 2)`` (100 .. 0)
``jpeg2000``           PIL JPEG 2000 (OpenJPEG, reversible 5/3 wavelet), compression ratio
                       ``300 ** L`` (1 .. 300); ratio 1 is lossless, i.e. the identity
``resample_nearest``   down- then up-sampling with PIL ``NEAREST``, ``scale = 1 + 3 * L`` (1 .. 4)
``resample_bilinear``  same with PIL ``BILINEAR`` (antialiased), ``scale = 1 + 3 * L``
``resample_bicubic``   same with PIL ``BICUBIC`` (antialiased), ``scale = 1 + 3 * L``
``contrast``           ``out = m + c * (x - m)`` with ``c = 1 - 0.85 * L`` (1 .. 0.15) and ``m``
                       the mean over all pixels and channels
``brightness``         over-exposure: ``out = clip(g * x + b)`` with gain ``g = 1 + 1.5 * L``
                       (1 .. 2.5) and offset ``b = 50 * L`` (0 .. 50)
``saturation``         ``out = Y + s * (x - Y)`` with ``Y`` the Rec. 601 luma and ``s = 1 - L``
                       (colour only: a no-op on grey images)
``pixelation``         box-average into blocks of ``1 + 9 * L ** 1.2`` px (1 .. 10), then
                       nearest-neighbour upsampling
``color_quantization`` uniform quantisation to ``round(2 ** (8 - 6.5 * L))`` values per channel
                       (256 .. 3), reconstructed at bin centres
====================== ============================================================================

The resampling types model the super-resolution degradation: at scale ``s`` an ``H x W`` image
is resized to ``round(H / s) x round(W / s)`` with the type's filter (PIL's bilinear and bicubic
filters are antialiased when downsampling) and back to exactly ``H x W`` with the same filter.
Levels 1/3, 2/3 and 1 give the usual x2, x3 and x4 factors.

Strengths: :data:`~.registry.STRENGTH_PRESETS` names level ranges and :func:`~.registry.sample_levels`
draws levels uniformly inside one. :func:`~.registry.is_grey` lets the pre-generator skip ``needs_color``
types on grey references, where they would produce the reference itself.

Modules
-------
:mod:`.registry` (the types by name, :func:`~.registry.apply_distortion`, strengths), one module per
family of functions (:mod:`.blur`, :mod:`.noise`, :mod:`.compression`, :mod:`.resampling`,
:mod:`.photometric`: contrast, brightness, saturation, colour quantisation), :mod:`.levels` (the
level -> parameter mappings above, shared by the functions and their descriptions) and :mod:`.checks`
(the argument checks and the uint8 output every function keeps to).
"""
