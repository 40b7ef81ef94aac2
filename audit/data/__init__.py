"""From a dataset to batches the model reads, with the regions the metrics need.

manifest    sources as one entries table (manifest, class folders, exports); class names
sources     COCO files and TensorFlow Datasets as entries tables; exports
decode      image and mask files to pixels (regular files only, large images shrunk)
preprocess  resize and scale for the model; masks for the region metrics
regions     the region masks of one image (object, box, face, background, ...)
faces       face boxes and masks (MTCNN detection, cached)
loader      one row to an image with its regions, or a skipped row; batches in threads
"""
