"""The built-in benchmarks' registrations: every fact about each (class count, default task
counts, folder, accepted layouts, where the data is published, its loader), in one place. This
module imports no torch: the loaders are named by string and imported when data is loaded."""
from __future__ import annotations

from clbench.benchmarks.base import Benchmark, register_benchmark

for _benchmark in (
    Benchmark(
        "imr", "ImageNet-R", 200, [5, 10, 20], load="clbench.benchmarks.datasets:load_imagenet_r",
        num_images=(24000, 6000), folder="imagenet-r", markers=("*/", "*train.*", "*test.*"),  # images: 80/20 of 30,000
        layouts="""\
  (1) pre-split archive (PILOT/APER; what SD-LoRA reads)
        imagenet-r/train/<wnid>/*.jpg      200 class folders, e.g. n01443537
        imagenet-r/test/<wnid>/*.jpg       the same 200
  (2) split lists (CODA-Prompt style) next to the images
        imagenet-r/imagenet-r_train.yaml   {data: [paths], targets: [ints]}, or *_train.txt
        imagenet-r/imagenet-r_test.yaml    lines '<path> <label>'; may also sit in imagenet-r/splits/
        imagenet-r/<wnid>/*.jpg
  (3) the raw release: split 80/20 once, written to the splits folder, reused afterwards
        imagenet-r/<wnid>/*.jpg            200 class folders""",
        source="https://github.com/hendrycks/imagenet-r (raw release), or the pre-split archive linked "
               "from the LAMDA-PILOT README (https://github.com/sun-hailong/LAMDA-PILOT)"),
    Benchmark(
        "ima", "ImageNet-A", 200, [10], load="clbench.benchmarks.datasets:load_imagenet_a", folder="imagenet-a", markers=("train/", "test/"),
        layouts="""\
  pre-split archive (PILOT/APER; what SD-LoRA and InfLoRA read)
        imagenet-a/train/<wnid>/*.jpg      200 class folders, e.g. n01498041
        imagenet-a/test/<wnid>/*.jpg       the same 200""",
        source="https://github.com/hendrycks/natural-adv-examples (raw release); the train/test split "
               "SD-LoRA uses is the pre-split archive linked from the LAMDA-PILOT README "
               "(https://github.com/sun-hailong/LAMDA-PILOT)"),
    Benchmark(
        "dn", "DomainNet", 345, [5], load="clbench.benchmarks.datasets:load_domainnet", folder="domainnet", markers=("*train.*", "*test.*", "splits/"),
        layouts="""\
  images of the six domains, plus split lists (concatenated per side; YAML wins over txt)
        domainnet/clipart/<class>/*.jpg    … infograph/ painting/ quickdraw/ real/ sketch/
        domainnet/domainnet_train.yaml     CODA-Prompt/InfLoRA: {data: [paths], targets: [ints]};
        domainnet/domainnet_test.yaml      a path prefix such as data/domainnet/ is dropped
      or
        domainnet/clipart_train.txt        DomainNet's own lists: '<domain>/<class>/<file>.jpg <label>'
        domainnet/clipart_test.txt         … one pair per domain
  lists may also sit in domainnet/splits/; labels are 0..344""",
        source="http://ai.bu.edu/M3SDA/ (images and <domain>_{train,test}.txt lists); the split used by "
               "CODA-Prompt and InfLoRA is dataloaders/splits/domainnet_{train,test}.yaml in "
               "https://github.com/GT-RIPL/CODA-Prompt or https://github.com/liangyanshuo/InfLoRA"),
    Benchmark(
        "c100", "CIFAR-100", 100, [10], load="clbench.benchmarks.datasets:load_cifar100",
        test_transform="clbench.benchmarks.datasets:cifar_test_transform", folder="cifar100",
        markers=("cifar-100-python/", "train"),
        layouts="""\
  torchvision's extracted archive (cifar-100-python.tar.gz)
        cifar100/cifar-100-python/{train,test,meta}   or <data root>/cifar-100-python/""",
        source="https://www.cs.toronto.edu/~kriz/cifar.html, or torchvision.datasets.CIFAR100(DIR, "
               "download=True) on a machine with internet, then copy DIR"),
    Benchmark(
        "cub", "CUB-200", 200, [10], load="clbench.benchmarks.datasets:load_cub", folder="cub",
        markers=("train/", "test/", "CUB_200_2011/", "images.txt"),
        layouts="""\
  (1) pre-split archive (APER/PILOT)
        cub/train/<class>/*.jpg            200 class folders, e.g. 001.Black_footed_Albatross
        cub/test/<class>/*.jpg             the same 200
  (2) the original release (CUB_200_2011.tgz extracted into cub/, or cub/ being that folder)
        cub/CUB_200_2011/images.txt, image_class_labels.txt, train_test_split.txt
        cub/CUB_200_2011/images/<class>/*.jpg""",
        source="https://www.vision.caltech.edu/datasets/cub_200_2011/ (original release); the pre-split "
               "archive is linked from the LAMDA-PILOT README (https://github.com/sun-hailong/LAMDA-PILOT)"),
    # 200 classes, as ImageNet-R: 5, 10 or 20 tasks; the default suite runs N=10 (README)
    Benchmark(
        "synth", "Synthetic", 200, [10], load="clbench.benchmarks.synth:load_synth", image_size=32, folder="synth",
        source="built in: generated offline by benchmarks/synth.py",
        defaults={"backbone": {"name": "vit_synth_patch8_32", "pretrained": True},  # synth.py registers it with timm
                  # in-memory tensors: worker processes would only add start-up time
                  "train": {"num_workers": 0}},
        train_transform="clbench.benchmarks.synth:synth_train_transform",
        test_transform="clbench.benchmarks.synth:synth_test_transform",
        stands_in_for="imr"),  # in ImageNet-R's regime: the report ranks it against ImageNet-R's order
):
    register_benchmark(_benchmark)
