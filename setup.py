"""Install the pipeline's packages (`components`, `pipelines`) and everything they need.

    pip install -c constraints.txt -e ".[dev]"

`constraints.txt` pins the whole tree (verified together on Python 3.11);
the pins below are the direct dependencies, including ones the big packages
need but do not declare.
"""

from setuptools import find_packages, setup

setup(
    name="transfer-pipeline",
    version="0.1.0",
    description="Reproducible transfer-learning pipeline for image classification (DVC + Beam + tf.Transform)",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["components", "components.*", "pipelines", "pipelines.*"]),
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "apache-beam==2.77.0",
        "tensorflow-transform==1.21.0",
        "tensorflow-datasets==4.9.10",
        "dvc==3.67.1",
        "dvclive==3.49.1",
        # Beam's TensorFlow RunInference handler imports tensorflow_hub.
        "tensorflow-hub==0.16.1",
        # tensorflow-datasets' download path needs it but does not declare it.
        "importlib_resources==7.1.0",
        # tf_keras' ImageDataGenerator (baseline benchmarks) needs scipy.
        "scipy==1.17.1",
        "pillow==12.3.0",
        "numpy==2.4.6",
        "pydantic==2.14.3",
        "PyYAML==6.0.3",
    ],
    extras_require={"dev": ["pytest==9.2.0", "pytest-xdist==3.8.0"]},
)
