from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="sam_backend",
    version="0.1.0",
    description="Interactive Segment Anything backend for Label Studio: click or box in, mask out",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sam_backend", "sam_backend.*"]),
    # Exact versions that work together live in constraints.txt; every install path uses it
    # (`pip install -c constraints.txt -e .`).
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "segment-anything==1.0",
        "segment-anything-hq==0.3",
        "timm",
        "numpy",
        "opencv-python-headless",
        "pillow",
        "pycocotools",
        "onnx",
        "onnxruntime",
        "onnxscript",
        # The web stack, maintained releases (constraints.txt pins them). label-studio-ml 1.0.9
        # (its `start` command) pins Flask 1.1.2 / Werkzeug 2.0.2, which
        # have published vulnerabilities, so it is not a requirement here: scripts/setup.sh
        # installs it with --no-deps, and these are what it really imports.
        "flask",
        "werkzeug",
        "label-studio-tools",
        "colorama",
        "appdirs",
        "attr",
        "attrs",
        "lxml",
        "redis",
        "rq",
        "label-studio-converter==0.0.59",
        "requests",
        "ujson",
        "tqdm",
        "filelock",
        "waitress==3.0.2",  # the HTTP server of both start commands (sam_backend/server/http.py)
        "PyYAML",  # export-yolo's data.yaml
        # SAM 3 (model_name=sam3): one code path on CPU and GPU; hub downloads
        "transformers==5.23.0",
        "huggingface_hub",
        "defusedxml",
        # training (sam-backend train): RF-DETR's Hungarian matcher; the reports' charts
        "scipy",
        "matplotlib",
    ],
    # mmengine-lite: mmengine's Config without opencv-python (which would clash with the pinned
    # opencv-python-headless); the tests load the MMDetection configs export-coco writes with it
    extras_require={"test": ["pytest", "pytest-timeout", "playwright", "mmengine-lite"]},
    entry_points={"console_scripts": ["sam-backend=sam_backend.cli:main"]},
)
