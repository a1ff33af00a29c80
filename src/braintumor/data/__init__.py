"""Reading: files to grey pixels, and the data set as the model sees it.

- ``inputs``: what a user points the tool at (images, DICOM, NIfTI, folders, globs, bytes) to slices;
- ``imaging``: decoding and resizing to grey ``uint8``;
- ``medical``: DICOM and NIfTI to slices, within a budget per input checked before decoding;
- ``series``: a DICOM slice's study, series, place, plane and sequence, from its header;
- ``dicom_series``: a DICOM series read once (headers and pixels together);
- ``sources``: several training sources, their manifests and subject splits;
- ``datasets``: the Kaggle folders, class discovery and the leak-free split;
- ``cache``: decoded images kept on disk between runs;
- ``duplicates``: perceptual hashes and near-duplicate groups;
- ``transforms``: the one place preprocessing lives (``Preprocessing``, stored with the weights)
  and the training augmentation.
"""
