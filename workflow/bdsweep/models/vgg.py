"""VGG19 with batch norm (torchvision). Its head is torchvision's: adaptive pooling to 7x7, then
4096-4096-classes linear layers with dropout, so at 32 px the single 1x1 feature map is repeated
49 times into the first linear layer, as in the survey's toolkit. Stages end at the ReLU before
each max-pool; features.49 is the last convolution."""

from . import ModelParts, register_torchvision

# Forward GFLOPs per image (torch.utils.flop_counter, 10 classes): bdsweep cost's fallback throughput.
register_torchvision("vgg19_bn", "VGG19-BN (torchvision, from scratch)", ModelParts(
    classifier="classifier.6",
    last_conv="features.49",
    stages=("features.5", "features.12", "features.25", "features.38", "features.51"),
    polarizer="features.49",
), forward_gflops={32: 1.035, 64: 3.424})
