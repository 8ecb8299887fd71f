# COCO fine-tuning of an odin_jax ResNet-50 export with mmdetection 3.x:
# Mask R-CNN R50-FPN, 1x schedule (12 epochs at 16 images), SyncBN in the
# backbone, the FPN and both heads, the whole network trained (DetCon §4).
# mmdetection's mask-rcnn_r50_fpn_1x_coco.py with the backbone initialised
# from the torchvision export (python -m odin_jax.export --format=
# torchvision writes WORKDIR/export/step_<N>/torchvision.pth; mmdet's
# ResNet, style='pytorch', has torchvision's key names, so the file loads
# into the backbone as is). docs/finetune.md has the command;
# tests/unit/test_finetune_configs.py checks this file against the export.
#
# The bases are named through the installed mmdet package ('mmdet::'), so
# this file works from anywhere (mmengine >= 0.7).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

# Replace with the export (or --cfg-options
# model.backbone.init_cfg.checkpoint=PATH).
checkpoint = 'WORKDIR/export/step_N/torchvision.pth'

norm_cfg = dict(type='SyncBN', requires_grad=True)
# mmcv's MMSyncBN accepts the empty batches a head can get (mmdetection's
# own SyncBN-everywhere configs use it in the heads).
head_norm_cfg = dict(type='MMSyncBN', requires_grad=True)

model = dict(
    # The export expects RGB normalised by the ImageNet mean / std (x 255);
    # mmdet decodes BGR, so it converts (bgr_to_rgb).
    data_preprocessor=dict(
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True),
    backbone=dict(
        type='ResNet',
        depth=50,
        style='pytorch',        # stride on the 3x3 conv, as the export
        frozen_stages=-1,       # fine-tune every stage, the stem included
        norm_cfg=norm_cfg,
        norm_eval=False,        # BN statistics keep training (SyncBN)
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',   # 4conv1fc: normalised box head
            conv_out_channels=256,
            norm_cfg=head_norm_cfg),
        mask_head=dict(norm_cfg=head_norm_cfg)))

# 1x: 12 epochs, lr x 0.1 after epochs 8 and 11, 500-iteration linear
# warm-up; SGD lr 0.02 for 16 images (8 GPUs x 2).
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True,
         milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001))
train_dataloader = dict(batch_size=2)
# Other GPU counts: --auto-scale-lr scales lr by (GPUs x 2) / 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)
