"""Neural networks on secret shares: PyTorch models in, secure models out.

    model = veil.nn.from_torch(torch_module)          # trace with torch.fx, fold BatchNorm
    net = veil.nn.share_model(session, model or None, owner="bob")
    logits = net(x_secret)

    veil.nn.private_inference(session, model or None, images or None, model_owner="bob", data_owner="alice")
"""

from veil.nn import losses, optim
from veil.nn.convert import UnsupportedModelError, from_torch
from veil.nn.graph import Graph, GraphError
from veil.nn.infer import InferenceResult, private_inference
from veil.nn.load import ModelFileError, load_model, save_state_dict
from veil.nn.losses import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, NLLLoss
from veil.nn.model import SecureModel, share_model
from veil.nn.onnx import from_onnx
from veil.nn.train import History, TensorDataset, evaluate, fit, plot_history

__all__ = ["BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "Graph", "GraphError", "History", "InferenceResult",
           "MSELoss", "ModelFileError", "NLLLoss", "SecureModel", "TensorDataset", "UnsupportedModelError", "evaluate",
           "fit", "from_onnx", "from_torch", "load_model", "losses", "optim", "plot_history", "private_inference",
           "save_state_dict", "share_model"]
