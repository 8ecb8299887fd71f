"""Evaluation metric library: what the papers measure features by.

Modules (import them directly; this package imports nothing heavy):
  discovery  Object discovery (Odin §3.2, App. A.4): best overlap of
             ground-truth segments with k-means proposals; ABO^i, ABO^c, OR.
  instances  Instance-recall analysis (instance-segmentation analysis paper,
             §3): spectral clustering for several K, connected-component
             splitting, recall grouped by same-class co-occurrence.
  video      Video label propagation (DINO's protocol, as in Odin Table 5):
             nearest-neighbour propagation of first-frame masks, J / F / J&F,
             and generated clips of moving textured objects.
  probes     Frozen-feature probes: linear per-pixel classifier (mIoU) and
             k-NN classification of pooled features.
  pictures   Image | ground truth | k-means segments | PCA of features
             panels (Odin Fig. 2 style) and PNG writing.
  datasets   Your own evaluation data: a folder of images with instance-id
             PNG masks (eval.folder_discovery), checked file by file.
"""
