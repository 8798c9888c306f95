"""Figures that show what a CrIBo model learned.

    python -m cribo_utils.figures clusters                       # random ViT, synthetic scenes
    python -m cribo_utils.figures clusters --pretrained_weights out/checkpoint.pth
    python -m cribo_utils.figures neighbours --pretrained_weights out/teacher_backbone.pth --images photos/
    python -m cribo_utils.figures dense --pretrained_weights vits16-in.pth --dataset voc --data_path VOC/
    python -m cribo_utils.figures attention --images photos/ --recursive --image_size 224
    python -m cribo_utils.figures curves --log out/log.txt

Five figures, each a function returning the path of the PNG it wrote (default folder ``figures/``), each
in its own module:

1. ``clusters`` (:func:`plot_clusters`, :mod:`.clusters`): two augmented views of an image and the
   teacher's joint two-view clustering of their patch tokens (docs/method.md, Sec. 4), one colour per
   cluster, the same colour in both views; clusters present in one view only (discarded by the method)
   are grey.
2. ``neighbours`` (:func:`plot_neighbours`, :mod:`.neighbours`): a memory bank is built on the fly from
   other images (teacher, clustering, per-view object representations, Sec. 7), then every shown object
   retrieves its nearest bank object from each view with the cycle-consistency test (Sec. 8); the
   retrieved object is drawn in the bank image it came from, framed green when the test passed and red
   when it failed.
3. ``dense`` (:func:`plot_dense`, :mod:`.dense`): image, ground truth and the dense nearest-neighbour
   prediction (:mod:`cribo_utils.eval.dense_nn`, docs/dense-nn-protocol.md, Part A), in the dataset's palette.
4. ``attention`` (:func:`plot_attention`, :mod:`.attention`): the last block's [CLS] attention of every
   head and the first three principal components of the patch features as RGB (:func:`pca_rgb`).
5. ``curves`` (:func:`plot_curves`, :mod:`.curves`): every loss term, the schedules, the cluster count
   and the cycle-consistent fraction against the iteration, from a training run's ``log.txt`` and
   ``log_iterations.txt``.

Shared by them: :mod:`.drawing` (palettes, picture helpers, the panel grid), :mod:`.model` (the backbone
and the image sources) and :mod:`.cli` (the command line, run by ``__main__``).

Every model figure runs on a randomly initialised ViT (no ``--pretrained_weights``) or on any checkpoint
:mod:`cribo_utils.weights.checkpoint_formats` reads, on the synthetic scenes (default) or on a folder of
images (``--images DIR``, optionally ``--recursive``). Settings not given on the command line are read from
the checkpoint's stored training arguments when it has them (``arch``, ``patch_size``, ``depth``,
``image_size``, ``n_tokens``, ``pos_alpha``), else from the weights themselves, else from the synthetic
CPU preset of :mod:`cribo_utils.train.parser`. Figure sizes are exact: a grid of ``rows x cols`` panels of
``panel`` inches at ``dpi`` is ``cols * panel_w * dpi`` by ``rows * panel_h * dpi`` pixels.
"""

from cribo_utils.figures.attention import attention_maps, plot_attention
from cribo_utils.figures.cli import FIGURES, get_args_parser, main, make_figure, output_path
from cribo_utils.figures.clusters import (
    ClusteredViews,
    cluster_image_views,
    highlight_object,
    make_two_views,
    overlay_clusters,
    plot_clusters,
)
from cribo_utils.figures.curves import (
    CURVE_PANELS,
    TrainingCurves,
    moving_average,
    plot_curves,
    read_training_curves,
)
from cribo_utils.figures.dense import plot_dense
from cribo_utils.figures.drawing import (
    CURVE_PANEL,
    DEFAULT_DPI,
    IGNORE_COLOUR,
    IMAGE_PANEL,
    INVALID_CLUSTER_COLOUR,
    blend,
    cluster_palette,
    colour_cluster_labels,
    colourise_mask,
    dataset_palette,
    denormalize,
    grid_pixel_size,
    label_boundaries,
    pca_rgb,
    random_palette,
    upsample_patch_grid,
)
from cribo_utils.figures.model import (
    FigureModel,
    list_image_files,
    load_figure_model,
    load_folder_images,
    square_input,
    synthetic_images,
)
from cribo_utils.figures.neighbours import ObjectBank, build_object_bank, plot_neighbours

__all__ = [
    "CURVE_PANEL",
    "CURVE_PANELS",
    "DEFAULT_DPI",
    "FIGURES",
    "IGNORE_COLOUR",
    "IMAGE_PANEL",
    "INVALID_CLUSTER_COLOUR",
    "ClusteredViews",
    "FigureModel",
    "ObjectBank",
    "TrainingCurves",
    "attention_maps",
    "blend",
    "build_object_bank",
    "cluster_image_views",
    "cluster_palette",
    "colour_cluster_labels",
    "colourise_mask",
    "dataset_palette",
    "denormalize",
    "get_args_parser",
    "grid_pixel_size",
    "highlight_object",
    "label_boundaries",
    "list_image_files",
    "load_figure_model",
    "load_folder_images",
    "main",
    "make_figure",
    "make_two_views",
    "moving_average",
    "output_path",
    "overlay_clusters",
    "pca_rgb",
    "plot_attention",
    "plot_clusters",
    "plot_curves",
    "plot_dense",
    "plot_neighbours",
    "random_palette",
    "read_training_curves",
    "square_input",
    "synthetic_images",
    "upsample_patch_grid",
]
