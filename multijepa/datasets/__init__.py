"""Data sets for every modality: folders, file lists, webdataset shards, one data file, in-memory tensors.

Lives at ``multijepa.datasets`` (not a top-level ``datasets``) so it never shadows Hugging Face's
widely installed ``datasets`` package. Decoders: ``multijepa.readers``.
"""

from multijepa.datasets.files import (FileDataset, FileIndex, expand_inputs, expand_samples, index_files, list_folder,
                                      load_input, read_filelist, resolve_recipe)
from multijepa.datasets.mixed import (AudioFolder, Files, ImageFolder, Mixed, PointCloudFolder, Source, Tensors,
                                      TimeSeriesFolder, VideoFolder, build_train_loader)
from multijepa.datasets.shards import ShardDataset, write_shards

__all__ = ["AudioFolder", "Files", "ImageFolder", "Mixed", "PointCloudFolder", "Source", "Tensors",
           "TimeSeriesFolder", "VideoFolder", "FileDataset", "FileIndex", "ShardDataset", "build_train_loader",
           "expand_inputs", "expand_samples", "index_files", "list_folder", "load_input", "read_filelist",
           "resolve_recipe", "write_shards"]
