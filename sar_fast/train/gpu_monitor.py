"""GPU utilisation, memory and power sampled through NVML (pynvml), when it is installed."""
from __future__ import annotations

import torch


def nvml_handle(nvml, device: torch.device):
    """The NVML handle of a CUDA device. NVML numbers all GPUs of the machine and ignores
    CUDA_VISIBLE_DEVICES, so the local CUDA index is matched by UUID (else PCI bus id)."""
    props = torch.cuda.get_device_properties(device.index or 0)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        try:
            return nvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else "GPU-" + text)
        except Exception:
            pass
    bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return nvml.nvmlDeviceGetHandleByPciBusId(bus)


class GpuMonitor:
    """Peak memory on a CUDA device; utilisation and memory in use through NVML
    (nvidia-ml-py), when present. Nothing on a CPU."""

    def __init__(self, device: torch.device):
        self.device, self.handle = device, None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = nvml_handle(pynvml, device)
        except Exception:
            self.handle = None

    def read(self) -> dict:
        if self.device.type != "cuda":
            return {}
        record = {"peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}
        if self.handle is None:
            return record
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
            record.update(gpu_util=float(util.gpu), gpu_mem_used_gb=mem.used / 2**30)
        except Exception:
            pass
        return record
