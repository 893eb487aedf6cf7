"""The registry of MNIST-format datasets: file names, pinned checksums, mirrors, classes.

Pure data, no I/O and no torch: params validation, the download stage and the IDX
reader all look datasets up here. Downloading lives in `download.py`, reading the
files in `idx.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdxFile:
    name: str
    size: int  # bytes of the decompressed payload: bounds what a download may inflate to
    gz_md5: str  # the official .gz file
    raw_sha256: str | None = None  # the decompressed payload, whatever the compression

    @property
    def payload(self) -> str:
        """The decompressed file's name: what the download stage keeps, so that its DVC hash
        is the data's and not the compression's (every mirror gives the same dvc.lock)."""
        return self.name.removesuffix(".gz")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    train_size: int = 60_000
    test_size: int = 10_000

    @property
    def files(self) -> tuple[IdxFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


def _idx_files(gz_md5: tuple[str, str, str, str], raw_sha256: tuple[str | None, ...] = (None,) * 4) -> dict:
    """The four files every MNIST-format dataset has: same names, same sizes (60,000 + 10,000 28×28 images)."""
    names = ("train_images", "train_labels", "test_images", "test_labels")
    files = (
        ("train-images-idx3-ubyte.gz", 16 + 60_000 * 784),
        ("train-labels-idx1-ubyte.gz", 8 + 60_000),
        ("t10k-images-idx3-ubyte.gz", 16 + 10_000 * 784),
        ("t10k-labels-idx1-ubyte.gz", 8 + 10_000),
    )
    return {
        key: IdxFile(name, size, md5, sha)
        for key, (name, size), md5, sha in zip(names, files, gz_md5, raw_sha256, strict=True)
    }


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        **_idx_files(
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
            (
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        ),
        mirrors=(
            "https://yann.lecun.com/exdb/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        **_idx_files(
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
            # sha256 of the payloads whose md5s Zalando publishes (f4a8712d…, 9018921c…, 8181f547…,
            # 15d48437…), computed from Debian's dataset-fashion-mnist after checking those md5s.
            (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
        mirrors=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        ),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "kmnist": DatasetSpec(
        name="kmnist",
        **_idx_files(
            (
                "bdb82020997e1d708af4cf47b453dcf7",
                "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7",
                "7320c461ea6c1c855c0b718fb2a4b134",
            ),
        ),
        # KMNIST publishes checksums of its .gz files only: a recompressed copy cannot be verified
        # (README: "Datasets"); pin its payloads through MNIST_CHECKSUMS if you have one.
        mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}
