"""The model zoo: the bundled reference models, their data sets, training, evaluation and checkpoints.

The library (``lowrank_fm`` and its core modules) never imports this subpackage; the command line, the
benchmarks, the scripts and the tests do. Its modules:

- :mod:`lowrank_fm.zoo.models`: models by name (``create_model``, ``list_models``), the shipped checkpoints
  (``checkpoints/``) and :func:`~lowrank_fm.zoo.models.load_bundled_approximated`.
- :mod:`lowrank_fm.zoo.networks`: the architectures (``VGGSmall``, ``ResNetSmall``, ``ResNetCifar``).
- :mod:`lowrank_fm.zoo.data`: data sets by name, including the embedded Fashion-MNIST sample (``embedded/``).
- :mod:`lowrank_fm.zoo.evaluate`: top-1 / top-5 accuracy.
- :mod:`lowrank_fm.zoo.training`, :mod:`lowrank_fm.zoo.image_training`, :mod:`lowrank_fm.zoo.cifar10_jpeg`:
  training of the reference models and their CIFAR-10 data.
"""
