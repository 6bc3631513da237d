"""The real benchmarks' loaders on tiny generated trees in each layout users really have."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import yaml
from helpers import CUB_CLASSES, WNIDS, class_tree, domainnet_tree, fake_cifar100, write_image
from torchvision import transforms as T

from clbench.benchmarks import datasets as D
from clbench.benchmarks.base import get_benchmark
from clbench.errors import DataError

TO_TENSOR = T.ToTensor()
def labels_of(ds) -> list[int]:
    return [int(y) for y in ds.targets]


# ----------------------------------------------------------------------------- ImageNet-R


def test_imr_presplit_folders(tmp_path):
    data = tmp_path / "imagenet-r"
    class_tree(data / "train", WNIDS, 3)
    class_tree(data / "test", WNIDS, 1)
    (data / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    write_image(data / "train" / WNIDS[0] / "._resource_fork.jpg")  # nor are hidden files images
    train, test = D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, tmp_path / "splits", num_classes=3)
    assert labels_of(train) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert labels_of(test) == [0, 1, 2]
    x, y = train[4]
    assert x.shape == (3, 8, 8) and y == 1
    assert "pre-split" in train.provenance
    assert not (tmp_path / "splits").exists()  # nothing to write for a pre-split archive


def test_imr_found_through_the_registry(tmp_path):
    class_tree(tmp_path / "imagenet-r" / "train", WNIDS, 1)
    class_tree(tmp_path / "imagenet-r" / "test", WNIDS, 1)
    bench = get_benchmark("imr")
    assert bench.data_dir(tmp_path) == tmp_path / "imagenet-r"
    with pytest.raises(DataError, match="found 3 class folders .* expected 200"):
        bench.load(bench.data_dir(tmp_path), TO_TENSOR, TO_TENSOR, tmp_path / "splits")


def test_imr_raw_split_is_stratified_80_20_written_once_and_reused(tmp_path, monkeypatch):
    data = tmp_path / "imagenet-r"
    class_tree(data, WNIDS, 10)
    (data / "README.txt").write_text("the release ships one")  # not an image, not a class
    splits = tmp_path / "splits"

    torch.manual_seed(1)
    train, test = D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, splits, num_classes=3)
    assert (len(train), len(test)) == (24, 6)
    assert np.bincount(train.targets).tolist() == [8, 8, 8]  # stratified: 8/2 in every class
    assert np.bincount(test.targets).tolist() == [2, 2, 2]
    paths = {train.path(i) for i in range(len(train))} | {test.path(i) for i in range(len(test))}
    assert len(paths) == 30
    assert all(Path(test.path(i)).parent.name == WNIDS[test.targets[i]] for i in range(len(test)))

    files = list(splits.glob("imr_split_*.json"))
    assert len(files) == 1 and "written to" in train.provenance
    doc = json.loads(files[0].read_text())
    assert doc["seed"] == D.SPLIT_SEED and len(doc["train"]) == 24 and len(doc["test"]) == 6
    assert not list(splits.glob(".*"))  # no temporary file left behind

    # A second run reads the file: making a split again would fail here.
    monkeypatch.setattr(D, "_stratified_split", lambda *a: pytest.fail("split made twice"))
    mtime = files[0].stat().st_mtime_ns
    torch.manual_seed(2)
    train2, test2 = D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, splits, num_classes=3)
    assert [test2.path(i) for i in range(len(test2))] == [test.path(i) for i in range(len(test))]
    assert files[0].stat().st_mtime_ns == mtime and "read from" in train2.provenance
    monkeypatch.undo()

    # Deterministic: a fresh splits folder gets the same file, byte for byte.
    D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, tmp_path / "splits2", num_classes=3)
    assert (tmp_path / "splits2" / files[0].name).read_bytes() == files[0].read_bytes()

    # A changed set of images gets a split of its own.
    write_image(data / WNIDS[0] / "img_99.jpg")
    train3, test3 = D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, splits, num_classes=3)
    assert len(list(splits.glob("imr_split_*.json"))) == 2 and len(train3) + len(test3) == 31


@pytest.mark.parametrize("damage", ["edited", "truncated"])
def test_imr_split_file_that_does_not_read_back_is_set_aside_and_made_again(tmp_path, capsys, damage):
    data = tmp_path / "imagenet-r"
    class_tree(data, WNIDS, 5)
    D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    split_file = next(tmp_path.glob("imr_split_*.json"))
    original = split_file.read_bytes()
    if damage == "edited":  # valid JSON, but not a partition of the images any more
        doc = json.loads(original)
        doc["test"].append(doc["train"][0])
        split_file.write_text(json.dumps(doc))
    else:
        split_file.write_bytes(original[: len(original) // 2])
    damaged = split_file.read_bytes()
    D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    err = capsys.readouterr().err
    assert f"split file {split_file} is corrupt" in err and "moved to " + split_file.name + ".corrupt" in err
    assert split_file.read_bytes() == original  # the split is a function of the images: the same again
    assert split_file.with_name(split_file.name + ".corrupt").read_bytes() == damaged  # kept, never deleted


def test_imr_split_lists_yaml_with_prefix_keep_their_labels(tmp_path):
    data = tmp_path / "imagenet-r"
    images = class_tree(data, WNIDS, 3)
    coda_label = {WNIDS[0]: 2, WNIDS[1]: 0, WNIDS[2]: 1}  # CODA's targets are not sorted-wnid order
    rel = [p.relative_to(data).as_posix() for p in images]
    for side, chosen in (("train", rel[0::3] + rel[1::3]), ("test", rel[2::3])):
        doc = {"data": [f"data/imagenet-r/{r}" for r in chosen],
               "targets": [coda_label[r.split("/")[0]] for r in chosen]}
        (data / f"imagenet-r_{side}.yaml").write_text(yaml.safe_dump(doc))
    train, test = D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, tmp_path / "splits", num_classes=3)
    assert (len(train), len(test)) == (6, 3)
    assert labels_of(test) == [2, 0, 1]
    assert test.path(0) == str(data / rel[2])
    assert "imagenet-r_train.yaml" in train.provenance
    assert not (tmp_path / "splits").exists()  # the lists are the split


# ----------------------------------------------------------------------------- DomainNet


def test_domainnet_txt_lists_are_concatenated(tmp_path):
    data = tmp_path / "domainnet"
    entries = domainnet_tree(data)
    train, test = D.load_domainnet(data, TO_TENSOR, TO_TENSOR, tmp_path / "splits", num_classes=3)
    assert (len(train), len(test)) == (12, 6)
    assert labels_of(train) == [y for _, y in entries["train"]]
    assert [test.path(i) for i in range(len(test))] == [str(data / r) for r, _ in entries["test"]]
    x, y = test[5]
    assert x.shape == (3, 8, 8) and y == 2


def test_domainnet_yaml_lists_win_over_txt_and_drop_the_path_prefix(tmp_path):
    data = tmp_path / "domainnet"
    entries = domainnet_tree(data)
    (data / "splits").mkdir()
    for side in ("train", "test"):
        chosen = entries[side][:: 2 if side == "train" else 1]
        doc = {"data": [f"data/domainnet/{r}" for r, _ in chosen], "targets": [y for _, y in chosen]}
        (data / "splits" / f"domainnet_{side}.yaml").write_text(yaml.safe_dump(doc))
    train, test = D.load_domainnet(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    assert len(train) == 6 and len(test) == 6  # the YAML's, not the txt files'
    assert train.path(1) == str(data / entries["train"][2][0])
    assert "domainnet_train.yaml" in train.provenance and "clipart_train.txt" not in train.provenance


def test_read_split_list_accepts_absolute_paths_of_another_machine(tmp_path):
    write_image(tmp_path / "real" / "cat" / "a.jpg")
    lst = tmp_path / "x_train.txt"
    lst.write_text("/home/someone/data/domainnet/real/cat/a.jpg 0\n\n")
    paths, labels = D.read_split_list(lst, tmp_path)
    assert paths == [str(tmp_path / "real" / "cat" / "a.jpg")] and labels == [0]


# ----------------------------------------------------------------------------- ImageNet-A and CUB


def test_ima_presplit_folders(tmp_path):
    data = tmp_path / "imagenet-a"
    class_tree(data / "train", WNIDS, 2)
    class_tree(data / "test", WNIDS, 2)
    train, test = D.load_imagenet_a(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    assert labels_of(train) == [0, 0, 1, 1, 2, 2] and len(test) == 6


def test_ima_raw_release_is_refused_with_a_reason(tmp_path):
    data = tmp_path / "imagenet-a"
    class_tree(data, WNIDS, 2)
    with pytest.raises(DataError, match="raw release.*pre-split") as err:
        D.load_imagenet_a(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    assert "natural-adv-examples" in str(err.value)


def test_cub_presplit_and_original_layouts_agree_on_labels(tmp_path):
    presplit = tmp_path / "a" / "cub"
    class_tree(presplit / "train", CUB_CLASSES, 2)
    class_tree(presplit / "test", CUB_CLASSES, 1)
    train_a, test_a = D.load_cub(presplit, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)

    root = tmp_path / "b" / "cub" / "CUB_200_2011"
    images = class_tree(root / "images", CUB_CLASSES, 3)
    rel = [p.relative_to(root / "images").as_posix() for p in images]
    (root / "images.txt").write_text("".join(f"{i} {r}\n" for i, r in enumerate(rel, 1)))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {(i - 1) // 3 + 1}\n" for i in range(1, 10)))
    (root / "train_test_split.txt").write_text("".join(f"{i} {int(i % 3 != 0)}\n" for i in range(1, 10)))
    train_b, test_b = D.load_cub(root.parent, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    assert labels_of(train_b) == labels_of(train_a) == [0, 0, 1, 1, 2, 2]
    assert labels_of(test_b) == labels_of(test_a) == [0, 1, 2]
    assert train_b.classes == CUB_CLASSES and test_b.path(0) == str(root / "images" / rel[2])
    assert train_b[0][0].shape == (3, 8, 8)
    # cub/ may also be the CUB_200_2011 folder itself
    assert len(D.load_cub(root, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)[0]) == 6


def test_cub_original_bad_line_names_file_and_line(tmp_path):
    root = tmp_path / "CUB_200_2011"
    class_tree(root / "images", CUB_CLASSES[:1], 1)
    (root / "images.txt").write_text(f"1 {CUB_CLASSES[0]}/img_00.jpg\n")
    (root / "image_class_labels.txt").write_text("1 one\n")
    (root / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(DataError, match=r"image_class_labels.txt, line 1: class id 'one'"):
        D.load_cub(tmp_path, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=1)


# ----------------------------------------------------------------------------- CIFAR-100


def test_cifar100_from_the_torchvision_pickles(tmp_path, monkeypatch):
    fake_cifar100(tmp_path / "cifar100")
    # The fake files cannot have the official md5s; trust their existence instead.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))
    bench = get_benchmark("c100")
    train_t, test_t = bench.transforms(64)
    data_dir = bench.data_dir(tmp_path)
    train, test = bench.load(data_dir, train_t, test_t, tmp_path)
    assert (len(train), len(test)) == (200, 100)
    assert labels_of(test) == list(range(100))
    x, y = test[7]
    assert x.shape == (3, 64, 64) and y == 7  # 32 px upscaled, as cifar224 does
    assert train[0][0].shape == (3, 64, 64)
    # data_dir may also be the cifar-100-python folder itself
    assert len(bench.load(data_dir / "cifar-100-python", train_t, test_t, tmp_path)[1]) == 100


def test_cifar100_corrupt_files_are_named(tmp_path):
    fake_cifar100(tmp_path)
    os.remove(tmp_path / "cifar-100-python" / "meta")
    with pytest.raises(DataError) as err:
        D.load_cifar100(tmp_path, TO_TENSOR, TO_TENSOR, tmp_path)
    msg = str(err.value)
    assert "train (md5 differs" in msg and "meta (missing)" in msg and "cs.toronto.edu" in msg


# ----------------------------------------------------------------------------- bad data

SOURCES = {"imr": "hendrycks/imagenet-r", "ima": "hendrycks/natural-adv-examples", "dn": "ai.bu.edu/M3SDA",
           "c100": "cs.toronto.edu/~kriz/cifar.html", "cub": "vision.caltech.edu/datasets/cub_200_2011"}


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_data_dir_says_where_what_and_how(tmp_path, name, state):
    bench = get_benchmark(name)
    if state == "empty":
        (tmp_path / bench.folder).mkdir()
    data_dir = bench.data_dir(tmp_path)
    with pytest.raises(DataError) as err:
        bench.load(data_dir, TO_TENSOR, TO_TENSOR, tmp_path / "splits")
    msg = str(err.value)
    assert str(data_dir) in msg and "Accepted layouts:" in msg and SOURCES[name] in msg
    assert "--data-root" in msg and "$CLBENCH_DATA" in msg
    assert f"{bench.folder}/" in msg or "cifar-100-python/" in msg  # the tree diagram


def test_wrong_class_count_names_count_place_and_examples(tmp_path):
    data = tmp_path / "imagenet-r"
    class_tree(data / "train", WNIDS[:2], 1)
    class_tree(data / "test", WNIDS[:2], 1)
    with pytest.raises(DataError) as err:
        D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    msg = str(err.value)
    assert f"found 2 class folders in {data / 'train'}, expected 3" in msg and WNIDS[1] in msg


def test_data_one_level_too_deep_gets_a_hint(tmp_path):
    data = tmp_path / "imagenet-r"
    class_tree(data / "imagenet-r", WNIDS, 1)
    with pytest.raises(DataError, match="one level deeper"):
        D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)


def test_train_and_test_class_folders_that_differ_are_named(tmp_path):
    data = tmp_path / "cub"
    class_tree(data / "train", CUB_CLASSES, 1)
    class_tree(data / "test", CUB_CLASSES[:2] + ["004.Groove_billed_Ani"], 1)
    with pytest.raises(DataError) as err:
        D.load_cub(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    msg = str(err.value)
    assert f"only in {data / 'train'} (003.Sooty_Albatross)" in msg
    assert f"only in {data / 'test'} (004.Groove_billed_Ani)" in msg


def test_only_a_train_folder_is_an_error(tmp_path):
    class_tree(tmp_path / "train", WNIDS, 1)
    with pytest.raises(DataError, match="train/ folder but no test/"):
        D.load_imagenet_a(tmp_path, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)


@pytest.mark.parametrize("layout", ["folders", "lists"])
def test_corrupt_image_names_the_file_when_loaded(tmp_path, layout):
    data = tmp_path / "imagenet-r"
    if layout == "folders":
        class_tree(data / "train", WNIDS, 1)
        class_tree(data / "test", WNIDS, 1)
        bad = data / "test" / WNIDS[1] / "img_00.jpg"
    else:
        domainnet_tree(data, domains=("real",), classes=WNIDS)
        bad = data / "real" / WNIDS[1] / "real_001_000002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    train, test = D.load_imagenet_r(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)  # lazy: no error yet
    test[0]
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        test[1]
    err = DataError(f"cannot read image {bad}")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # survives a DataLoader worker


def test_bad_split_list_line_names_file_and_line(tmp_path):
    data = tmp_path / "domainnet"
    domainnet_tree(data)
    lst = data / "sketch_test.txt"
    lines = lst.read_text().splitlines()
    lines[1] = lines[1].split()[0]  # the label is gone
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{lst}, line 2: cannot parse"):
        D.load_domainnet(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)


def test_split_list_pointing_to_missing_files_names_file_and_lines(tmp_path):
    data = tmp_path / "domainnet"
    domainnet_tree(data)
    os.remove(data / "clipart" / "bee" / "clipart_001_000001.jpg")
    with pytest.raises(DataError) as err:
        D.load_domainnet(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)
    msg = str(err.value)
    assert f"{data / 'clipart_train.txt'}: 1 of 6 entries point to missing files" in msg
    assert "line 4: 'clipart/bee/clipart_001_000001.jpg'" in msg


def test_split_list_label_out_of_range_and_bad_yaml(tmp_path):
    data = tmp_path / "domainnet"
    domainnet_tree(data)
    with pytest.raises(DataError, match=r"clipart_train.txt, line 5: label 2 .* out of range for 2 classes"):
        D.load_domainnet(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=2)
    (data / "domainnet_train.yaml").write_text("data: [a.jpg]\n")
    (data / "domainnet_test.yaml").write_text("data: [a.jpg]\ntargets: [0]\n")
    with pytest.raises(DataError, match="domainnet_train.yaml: expected a YAML mapping with a 'data:'"):
        D.load_domainnet(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=3)


def test_train_lists_that_miss_classes_are_an_error(tmp_path):
    data = tmp_path / "domainnet"
    domainnet_tree(data)
    with pytest.raises(DataError, match=r"cover 3 classes, expected 4 \(labels never used: 3\)"):
        D.load_domainnet(data, TO_TENSOR, TO_TENSOR, tmp_path, num_classes=4)


def test_registered_entries_match_the_paper():
    expected = {"imr": (200, [5, 10, 20], "imagenet-r"), "ima": (200, [10], "imagenet-a"),
                "dn": (345, [5], "domainnet"), "c100": (100, [10], "cifar100"), "cub": (200, [10], "cub")}
    for name, (classes, tasks, folder) in expected.items():
        bench = get_benchmark(name)
        assert (bench.num_classes, bench.default_tasks, bench.folder) == (classes, tasks, folder)
        loader = getattr(bench.load, "resolved", bench.load)  # a "module:function" registration, imported
        assert loader.__kwdefaults__["num_classes"] == classes  # the loader checks the same count
