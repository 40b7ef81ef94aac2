"""The engine: load a Keras model, cut it at the target layer, and compute class
activation maps in one compiled step on any Keras backend.

    models       load models safely; cut them at the target layer (features / logit head)
    cam_methods  the CAM formulas (Grad-CAM, HiResCAM, Grad-CAM++, XGrad-CAM, LayerCAM, ...)
    backends     the backward pass through the head on TensorFlow, JAX or PyTorch
    explain      ``GradCAM``: batched maps, predictions and counterfactual maps
    guided       Guided backpropagation and Guided Grad-CAM
"""
