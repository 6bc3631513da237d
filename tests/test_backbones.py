"""Backbones by timm name: local weights files, and the offline error that says how to get them."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from clbench.backbones import create_backbone
from clbench.config import BackboneConfig
from clbench.errors import PretrainedWeightsError


def test_local_weights_file_is_loaded_exactly(tmp_path):
    source = timm.create_model("vit_toy_patch4_16", num_classes=5)
    path = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model, ident = create_backbone(BackboneConfig(name="vit_toy_patch4_16", pretrained_path=str(path)))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    assert model.num_features == 32 and "sha1:" in ident  # the head was dropped: features out
    torch.save(source.state_dict(), tmp_path / "toy.pth")  # .pth works the same way
    create_backbone(BackboneConfig(name="vit_toy_patch4_16", pretrained_path=str(tmp_path / "toy.pth")))


def test_wrong_architecture_file_is_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(PretrainedWeightsError, match="does not fit vit_toy_patch4_16"):
        create_backbone(BackboneConfig(name="vit_toy_patch4_16", pretrained_path=str(path)))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_backbone(BackboneConfig(name="vit_toy_patch4_16", pretrained_path=str(tmp_path / "nope.pth")))


def test_missing_weights_offline_name_the_model_and_both_fixes(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so patch it
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    name = "vit_tiny_patch16_224.augreg_in21k"  # a small model: the same code path as ViT-B, fast
    with pytest.raises(PretrainedWeightsError) as err:
        create_backbone(BackboneConfig(name=name))
    message = str(err.value)
    assert name in message and "--pretrained-path" in message and "cache" in message
