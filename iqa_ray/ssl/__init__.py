"""Quality-aware self-supervised pre-training of any backbone on unlabelled images.

Follows the image side of QualiCLIP (Agnolucci, Galteri, Bertini, "Quality-Aware Image-Text
Alignment for Opinion-Unaware Image Quality Assessment", 2024). QualiCLIP degrades unlabelled
photos synthetically at increasing intensities and trains CLIP's image encoder so that the
similarity to the antonym prompts "Good photo." / "Bad photo." ranks the degraded versions in
order, while two crops of one photo degraded at the same intensity get consistent
representations. There is no text here: the two prompt embeddings become two learnable anchor
vectors in a quality-embedding space, so the recipe works for every timm backbone of the project.

The objective, for one unlabelled image:

1. Two random ``crop_size`` crops (same content statistics, different pixels).
2. One distortion type drawn for the image (types that need colour are skipped on grey photos)
   and ``levels`` = K increasing levels, evenly spaced in ``level_range`` and jittered by up to
   ``level_jitter`` of half the spacing (so the order never changes). Each crop is degraded at
   every level with the same random draws (noise pattern, blur angle), so a higher level is a
   stronger version of the same degradation.
3. Every degraded crop goes through the encoder: backbone -> global average pool of the last
   stage -> MLP projection -> L2-normalised quality embedding ``e``; its quality score is
   ``s = (cos(e, a_good) - cos(e, a_bad)) / 2`` in [-1, 1] with learnable anchors ``a_good``,
   ``a_bad`` (the image-only stand-ins for the two prompts). A bounded score is what makes the
   ranking margin mean something: an unbounded score could meet any margin by scaling up.
4. Loss = ``ranking_weight * L_rank + agreement_weight * L_agree``:

   * ``L_rank``: margin ranking over all ordered level pairs i < j within each crop,
     ``mean(relu(margin - (s_i - s_j)))`` (the less degraded crop must score higher);
   * ``L_agree``: ``mean(1 - cos(e_crop1_k, e_crop2_k))`` over the levels, so the embedding
     depends on the degradation, not on which part of the photo is seen (content-independent
     quality).

Only the backbone is kept: :func:`~iqa_ray.models.encoder_file.save_encoder` writes its ``state_dict`` in the
``iqa-ray-encoder`` format and :func:`~iqa_ray.models.encoder_file.load_encoder_into` loads it into a quality model's backbone
for fine-tuning (``TrainConfig`` key ``pretrained_encoder``, with a smaller ``backbone_lr``).

Why a second loop next to :mod:`iqa_ray.training.engine`: the engine's loop is the supervised one (labels,
validation SRCC, model selection); this one has no labels and a different sample (an image turned
into 2 x K crops), so it is not a copy of the engine's loop. It reuses the engine's seeding and
checkpoint helpers, and like the engine it re-seeds from ``(seed, epoch)`` at every epoch, so a run
resumed from epoch k's checkpoint equals an uninterrupted one.

The package, by concern: :mod:`~iqa_ray.ssl.config` (:class:`PretrainConfig`),
:mod:`~iqa_ray.ssl.data` (unlabelled images and the 2 x K sample), :mod:`~iqa_ray.ssl.model`
(:class:`QualityEncoder` and :func:`ssl_loss`), :mod:`~iqa_ray.ssl.loop` (:func:`pretrain`,
checkpoints); the encoder file format is :mod:`iqa_ray.models.encoder_file`.
"""
