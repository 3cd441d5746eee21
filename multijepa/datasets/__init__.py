"""Data sets for every modality: folders, file lists, webdataset shards, one data file.

Lives at ``multijepa.datasets`` (not a top-level ``datasets``) so it never shadows Hugging Face's
widely installed ``datasets`` package.
"""

from multijepa.datasets.files import (FileDataset, FileIndex, ShardDataset, StepBatchSampler, build_train_loader,
                                      expand_samples, index_files, list_folder, load_input, read_filelist,
                                      resolve_recipe, write_shards)
from multijepa.datasets.mixed import (AudioFolder, Files, ImageFolder, Mixed, PointCloudFolder, Source, Tensors,
                                      TimeSeriesFolder, VideoFolder)
from multijepa.datasets.readers import EXTENSIONS, PointSet, modality_of, read_audio, read_image, read_points
from multijepa.datasets.series import read_series

__all__ = ["AudioFolder", "Files", "ImageFolder", "Mixed", "PointCloudFolder", "Source", "Tensors",
           "TimeSeriesFolder", "VideoFolder", "EXTENSIONS", "FileDataset", "FileIndex", "PointSet", "ShardDataset",
           "StepBatchSampler", "build_train_loader", "expand_samples", "index_files", "list_folder", "load_input",
           "modality_of", "read_audio", "read_filelist", "read_image", "read_points", "read_series", "resolve_recipe",
           "write_shards"]
