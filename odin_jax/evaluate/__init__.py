"""Evaluation: what the papers measure features by (docs/evaluation.md).

Modules (import them directly; this package imports nothing heavy):
  runner       the driver: sources, the registry of evaluations (name ->
               module with `run(ctx)`), results JSON / PNG / TensorBoard.
  settings     EvalSettings: every config.eval field and its default.
  context      Context (what `run(ctx)` receives) and Output.
  features     parameters (checkpoint / initialisation) -> feature maps.
  datasets     demo scenes, COCO, DAVIS, a folder (files: folder.py).
  clustering   k-means and spectral proposals (one compiled k-means).
  discovery    Object discovery (Odin §3.2, App. A.4): ABO^i, ABO^c, OR.
  instances    Instance recall by same-class co-occurrence (instance-
               segmentation analysis paper, §3).
  video        DINO's label propagation (scores: video_metrics, generated
               clips: clips).
  probes, knn  Frozen-feature linear probe (mIoU) and k-NN.
  pictures     image | ground truth | k-means segments | feature PCA.
  linear       BYOL's linear evaluation (opt-in: imagenet_linear).
  report       The end-of-training report (θ vs ξ vs random init vs FH).
"""
