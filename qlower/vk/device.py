"""A small Vulkan compute harness over the ``vulkan`` package (cffi bindings).

Just what qlower's kernels need: pick a device, storage buffers, compute
pipelines from the shipped SPIR-V, dispatches with push constants, barriers
and timestamp queries. Every buffer is a plain storage buffer of 32-bit words,
so no optional device feature (8/16-bit storage, fp16 arithmetic) is needed.

Device choice: ``open_device(select)`` or the ``QLOWER_VK_DEVICE`` environment
variable; ``select`` is an index into the physical-device list or a
case-insensitive substring of the device name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qlower.errors import DeviceError
from qlower.shaders import load_manifest, spv_path

ENV_DEVICE = "QLOWER_VK_DEVICE"
_NO_DEVICE_HINT = (
    "install a Vulkan loader and driver (Debian: apt install libvulkan1 "
    "mesa-vulkan-drivers, which provides the lavapipe CPU device) and "
    "`pip install vulkan cffi`; `vulkaninfo --summary` lists what is visible"
)
# Large enough for every shader's push-constant block; a layout may declare
# more than a shader uses.
PUSH_CONSTANT_BYTES = 128


def _import_vk():
    try:
        import vulkan as vk  # raises OSError when libvulkan.so.1 is missing
    except ImportError as e:
        raise DeviceError("the `vulkan` Python package is not installed", _NO_DEVICE_HINT) from e
    except OSError as e:
        raise DeviceError("no Vulkan loader (libvulkan.so.1) was found", _NO_DEVICE_HINT) from e
    return vk


@dataclass
class Buffer:
    handle: object
    memory: object
    size: int
    mapped: object  # cffi buffer when host-visible, else None


@dataclass
class Pipeline:
    name: str
    pipeline: object
    layout: object
    set_layout: object
    bindings: int
    local_size: tuple[int, int, int]


def list_devices() -> list[str]:
    """Names of the Vulkan physical devices, in the order ``select`` indexes."""
    vk = _import_vk()
    inst = _create_instance(vk)
    try:
        return [
            vk.vkGetPhysicalDeviceProperties(pd).deviceName
            for pd in vk.vkEnumeratePhysicalDevices(inst)
        ]
    finally:
        vk.vkDestroyInstance(inst, None)


def _create_instance(vk):
    app = vk.VkApplicationInfo(
        pApplicationName="qlower", applicationVersion=1, pEngineName="qlower",
        engineVersion=1, apiVersion=vk.VK_MAKE_VERSION(1, 1, 0),
    )
    try:
        return vk.vkCreateInstance(vk.VkInstanceCreateInfo(pApplicationInfo=app), None)
    except vk.VkError as e:
        raise DeviceError(f"vkCreateInstance failed ({type(e).__name__})", _NO_DEVICE_HINT) from e


def open_device(select: str | int | None = None) -> "Device":
    """Open a Vulkan device; raises ``DeviceError`` when there is none."""
    return Device(select)


class Device:
    def __init__(self, select: str | int | None = None):
        vk = self.vk = _import_vk()
        if select is None:
            select = os.environ.get(ENV_DEVICE) or None
        self.instance = _create_instance(vk)
        pds = vk.vkEnumeratePhysicalDevices(self.instance)
        if not pds:
            raise DeviceError("no Vulkan physical device is visible", _NO_DEVICE_HINT)
        names = [vk.vkGetPhysicalDeviceProperties(pd).deviceName for pd in pds]
        self.physical = pds[self._choose(names, select)]
        props = vk.vkGetPhysicalDeviceProperties(self.physical)
        self.name = props.deviceName
        self.timestamp_period_ns = float(props.limits.timestampPeriod)
        self.max_workgroups = int(props.limits.maxComputeWorkGroupCount[0])

        families = vk.vkGetPhysicalDeviceQueueFamilyProperties(self.physical)
        compute = [i for i, f in enumerate(families) if f.queueFlags & vk.VK_QUEUE_COMPUTE_BIT]
        if not compute:
            raise DeviceError(f"Vulkan device {self.name!r} has no compute queue")
        # Prefer a queue that can time: timestampValidBits > 0.
        compute.sort(key=lambda i: families[i].timestampValidBits == 0)
        self.queue_family = compute[0]
        self.can_time = families[self.queue_family].timestampValidBits > 0 and props.limits.timestampPeriod > 0

        qinfo = vk.VkDeviceQueueCreateInfo(
            queueFamilyIndex=self.queue_family, queueCount=1, pQueuePriorities=[1.0]
        )
        self.device = vk.vkCreateDevice(
            self.physical,
            vk.VkDeviceCreateInfo(queueCreateInfoCount=1, pQueueCreateInfos=[qinfo]),
            None,
        )
        self.queue = vk.vkGetDeviceQueue(self.device, self.queue_family, 0)
        self.cmd_pool = vk.vkCreateCommandPool(
            self.device,
            vk.VkCommandPoolCreateInfo(
                queueFamilyIndex=self.queue_family,
                flags=vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
            ),
            None,
        )
        self.fence = vk.vkCreateFence(self.device, vk.VkFenceCreateInfo(), None)
        self.desc_pool = None
        self._new_descriptor_pool()
        self.mem_props = vk.vkGetPhysicalDeviceMemoryProperties(self.physical)
        self._pipelines: dict[str, Pipeline] = {}
        self._sets: dict[tuple, object] = {}
        self._buffers: list[Buffer] = []
        self._query_pool = None
        self._query_count = 0
        self.is_cpu = props.deviceType == vk.VK_PHYSICAL_DEVICE_TYPE_CPU

    # -- selection -----------------------------------------------------------
    @staticmethod
    def _choose(names: list[str], select) -> int:
        if select is None or select == "":
            # Prefer a real GPU over a CPU implementation when both exist.
            cpu = [("llvmpipe" in n.lower() or "swiftshader" in n.lower()) for n in names]
            return cpu.index(False) if False in cpu else 0
        if isinstance(select, int) or str(select).isdigit():
            i = int(select)
            if not 0 <= i < len(names):
                raise DeviceError(
                    f"Vulkan device index {i} out of range", f"visible devices: {names}"
                )
            return i
        hits = [i for i, n in enumerate(names) if str(select).lower() in n.lower()]
        if not hits:
            raise DeviceError(
                f"no Vulkan device matches {select!r}", f"visible devices: {names}"
            )
        return hits[0]

    # -- memory --------------------------------------------------------------
    def _memory_type(self, bits: int, want: int, avoid: int = 0) -> int | None:
        for i in range(self.mem_props.memoryTypeCount):
            flags = self.mem_props.memoryTypes[i].propertyFlags
            if bits & (1 << i) and (flags & want) == want and not (flags & avoid):
                return i
        return None

    def buffer(self, nbytes: int, host: bool = False) -> Buffer:
        """A storage buffer of at least ``nbytes`` (rounded up to 16)."""
        vk = self.vk
        size = max(16, (int(nbytes) + 15) // 16 * 16)
        usage = (
            vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT
            | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT
            | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT
        )
        handle = vk.vkCreateBuffer(
            self.device,
            vk.VkBufferCreateInfo(size=size, usage=usage, sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE),
            None,
        )
        req = vk.vkGetBufferMemoryRequirements(self.device, handle)
        hv = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
        dl = vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT
        if host:
            idx = self._memory_type(req.memoryTypeBits, hv)
        else:
            # Device-local and mappable (CPU devices, unified memory), else
            # device-local with staging copies, else anything.
            idx = self._memory_type(req.memoryTypeBits, dl | hv)
            if idx is not None and not self._is_cpu_like():
                idx = None  # a small BAR window: keep big weights out of it
            if idx is None:
                idx = self._memory_type(req.memoryTypeBits, dl)
            if idx is None:
                idx = self._memory_type(req.memoryTypeBits, 0)
        if idx is None:
            raise DeviceError(f"no suitable memory type on {self.name!r}")
        try:
            memory = vk.vkAllocateMemory(
                self.device, vk.VkMemoryAllocateInfo(allocationSize=req.size, memoryTypeIndex=idx), None
            )
        except vk.VkError as e:
            vk.vkDestroyBuffer(self.device, handle, None)
            raise DeviceError(f"could not allocate {size} bytes on {self.name!r}") from e
        vk.vkBindBufferMemory(self.device, handle, memory, 0)
        flags = self.mem_props.memoryTypes[idx].propertyFlags
        mapped = vk.vkMapMemory(self.device, memory, 0, size, 0) if (flags & hv) == hv else None
        buf = Buffer(handle, memory, size, mapped)
        self._buffers.append(buf)
        return buf

    def _is_cpu_like(self) -> bool:
        props = self.vk.vkGetPhysicalDeviceProperties(self.physical)
        return props.deviceType in (
            self.vk.VK_PHYSICAL_DEVICE_TYPE_CPU, self.vk.VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU
        )

    def free(self, buf: Buffer) -> None:
        vk = self.vk
        if buf.mapped is not None:
            vk.vkUnmapMemory(self.device, buf.memory)
        vk.vkDestroyBuffer(self.device, buf.handle, None)
        vk.vkFreeMemory(self.device, buf.memory, None)
        self._buffers = [b for b in self._buffers if b is not buf]
        self._sets = {k: v for k, v in self._sets.items() if id(buf) not in k}

    def upload(self, buf: Buffer, data: np.ndarray | bytes, offset: int = 0) -> None:
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        if offset + len(raw) > buf.size:
            raise ValueError(f"{len(raw)} bytes do not fit a {buf.size}-byte buffer")
        if buf.mapped is not None:
            buf.mapped[offset : offset + len(raw)] = raw
            return
        stage = self.buffer(len(raw), host=True)
        stage.mapped[0 : len(raw)] = raw
        with self.commands() as c:
            c.copy(stage, buf, len(raw), dst_offset=offset)
        self.free(stage)

    def to_device(self, data: np.ndarray, min_bytes: int = 0) -> Buffer:
        raw = np.ascontiguousarray(data).tobytes()
        buf = self.buffer(max(len(raw), min_bytes))
        if min_bytes > len(raw):
            raw += b"\0" * (buf.size - len(raw))
        self.upload(buf, raw)
        return buf

    def download(self, buf: Buffer, dtype, count: int | None = None) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = buf.size if count is None else count * dtype.itemsize
        if buf.mapped is not None:
            return np.frombuffer(bytes(buf.mapped[0:nbytes]), dtype=dtype).copy()
        stage = self.buffer(nbytes, host=True)
        with self.commands() as c:
            c.copy(buf, stage, nbytes)
        out = np.frombuffer(bytes(stage.mapped[0:nbytes]), dtype=dtype).copy()
        self.free(stage)
        return out

    # -- pipelines -----------------------------------------------------------
    def pipeline(self, name: str) -> Pipeline:
        if name in self._pipelines:
            return self._pipelines[name]
        vk = self.vk
        entry = load_manifest()["shaders"].get(name)
        if entry is None:
            raise DeviceError(f"no shipped shader named {name!r}")
        code = spv_path(name).read_bytes()
        module = vk.vkCreateShaderModule(
            self.device, vk.VkShaderModuleCreateInfo(codeSize=len(code), pCode=code), None
        )
        nb = int(entry["bindings"])
        binds = [
            vk.VkDescriptorSetLayoutBinding(
                binding=i, descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                descriptorCount=1, stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT,
            )
            for i in range(nb)
        ]
        set_layout = vk.vkCreateDescriptorSetLayout(
            self.device, vk.VkDescriptorSetLayoutCreateInfo(bindingCount=nb, pBindings=binds), None
        )
        push = vk.VkPushConstantRange(
            stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT, offset=0, size=PUSH_CONSTANT_BYTES
        )
        layout = vk.vkCreatePipelineLayout(
            self.device,
            vk.VkPipelineLayoutCreateInfo(
                setLayoutCount=1, pSetLayouts=[set_layout],
                pushConstantRangeCount=1, pPushConstantRanges=[push],
            ),
            None,
        )
        stage = vk.VkPipelineShaderStageCreateInfo(
            stage=vk.VK_SHADER_STAGE_COMPUTE_BIT, module=module, pName="main"
        )
        pipe = vk.vkCreateComputePipelines(
            self.device, vk.VK_NULL_HANDLE, 1,
            [vk.VkComputePipelineCreateInfo(stage=stage, layout=layout)], None,
        )[0]
        vk.vkDestroyShaderModule(self.device, module, None)
        p = Pipeline(name, pipe, layout, set_layout, nb, tuple(entry["local_size"]))
        self._pipelines[name] = p
        return p

    def _new_descriptor_pool(self):
        vk = self.vk
        if self.desc_pool is not None:
            self._old_pools.append(self.desc_pool)
        else:
            self._old_pools = []
        size = vk.VkDescriptorPoolSize(type=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, descriptorCount=8192)
        self.desc_pool = vk.vkCreateDescriptorPool(
            self.device,
            vk.VkDescriptorPoolCreateInfo(maxSets=1024, poolSizeCount=1, pPoolSizes=[size]),
            None,
        )
        self._sets_in_pool = 0

    def _descriptor_set(self, pipe: Pipeline, bufs: Sequence[Buffer]):
        key = (pipe.name,) + tuple(id(b) for b in bufs)
        if key in self._sets:
            return self._sets[key]
        vk = self.vk
        if len(bufs) != pipe.bindings:
            raise ValueError(f"{pipe.name} takes {pipe.bindings} buffers, got {len(bufs)}")
        if self._sets_in_pool >= 1024:
            self._new_descriptor_pool()
        ds = vk.vkAllocateDescriptorSets(
            self.device,
            vk.VkDescriptorSetAllocateInfo(
                descriptorPool=self.desc_pool, descriptorSetCount=1, pSetLayouts=[pipe.set_layout]
            ),
        )[0]
        self._sets_in_pool += 1
        writes = [
            vk.VkWriteDescriptorSet(
                dstSet=ds, dstBinding=i, descriptorCount=1,
                descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                pBufferInfo=[vk.VkDescriptorBufferInfo(buffer=b.handle, offset=0, range=b.size)],
            )
            for i, b in enumerate(bufs)
        ]
        vk.vkUpdateDescriptorSets(self.device, len(writes), writes, 0, None)
        self._sets[key] = ds
        return ds

    def _queries(self, n: int):
        vk = self.vk
        if self._query_pool is not None and self._query_count >= n:
            return self._query_pool
        if self._query_pool is not None:
            vk.vkDestroyQueryPool(self.device, self._query_pool, None)
        self._query_count = max(n, 64)
        self._query_pool = vk.vkCreateQueryPool(
            self.device,
            vk.VkQueryPoolCreateInfo(queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=self._query_count),
            None,
        )
        return self._query_pool

    def commands(self, max_timestamps: int = 0) -> "Commands":
        return Commands(self, max_timestamps)

    def close(self) -> None:
        vk = self.vk
        if self.device is None:
            return
        vk.vkDeviceWaitIdle(self.device)
        for b in list(self._buffers):
            self.free(b)
        for p in self._pipelines.values():
            vk.vkDestroyPipeline(self.device, p.pipeline, None)
            vk.vkDestroyPipelineLayout(self.device, p.layout, None)
            vk.vkDestroyDescriptorSetLayout(self.device, p.set_layout, None)
        if self._query_pool is not None:
            vk.vkDestroyQueryPool(self.device, self._query_pool, None)
        for pool in [*self._old_pools, self.desc_pool]:
            vk.vkDestroyDescriptorPool(self.device, pool, None)
        vk.vkDestroyFence(self.device, self.fence, None)
        vk.vkDestroyCommandPool(self.device, self.cmd_pool, None)
        vk.vkDestroyDevice(self.device, None)
        vk.vkDestroyInstance(self.instance, None)
        self.device = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Commands:
    """One command buffer: record in a ``with`` block, submitted and waited on exit."""

    def __init__(self, dev: Device, max_timestamps: int = 0):
        vk = dev.vk
        self.dev, self.vk = dev, vk
        self.cmd = vk.vkAllocateCommandBuffers(
            dev.device,
            vk.VkCommandBufferAllocateInfo(
                commandPool=dev.cmd_pool, level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1
            ),
        )[0]
        self.n_ts = 0
        self.max_ts = max_timestamps
        self.ticks: list[int] = []

    def __enter__(self):
        vk = self.vk
        vk.vkBeginCommandBuffer(
            self.cmd, vk.VkCommandBufferBeginInfo(flags=vk.VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT)
        )
        if self.max_ts:
            if not self.dev.can_time:
                raise DeviceError(f"{self.dev.name!r} cannot write timestamps on its compute queue")
            pool = self.dev._queries(self.max_ts)
            vk.vkCmdResetQueryPool(self.cmd, pool, 0, self.max_ts)
        return self

    def dispatch(self, pipe: Pipeline | str, bufs: Sequence[Buffer], push: bytes = b"",
                 groups: tuple[int, int, int] = (1, 1, 1)) -> None:
        vk = self.vk
        if isinstance(pipe, str):
            pipe = self.dev.pipeline(pipe)
        ds = self.dev._descriptor_set(pipe, bufs)
        vk.vkCmdBindPipeline(self.cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipe.pipeline)
        vk.vkCmdBindDescriptorSets(
            self.cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipe.layout, 0, 1, [ds], 0, None
        )
        if push:
            if len(push) > PUSH_CONSTANT_BYTES:
                raise ValueError("push constants too large")
            push = push + b"\0" * (-len(push) % 4)
            vk.vkCmdPushConstants(
                self.cmd, pipe.layout, vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(push),
                vk.ffi.from_buffer(push),
            )
        gx, gy, gz = (int(g) for g in groups)
        if min(gx, gy, gz) <= 0:
            return
        if max(gx, gy, gz) > self.dev.max_workgroups:
            raise DeviceError(f"dispatch of {groups} workgroups exceeds the device limit")
        vk.vkCmdDispatch(self.cmd, gx, gy, gz)

    def barrier(self) -> None:
        """Make earlier shader and transfer writes visible to later commands."""
        vk = self.vk
        mb = vk.VkMemoryBarrier(
            srcAccessMask=vk.VK_ACCESS_SHADER_WRITE_BIT | vk.VK_ACCESS_TRANSFER_WRITE_BIT,
            dstAccessMask=vk.VK_ACCESS_SHADER_READ_BIT | vk.VK_ACCESS_SHADER_WRITE_BIT
            | vk.VK_ACCESS_TRANSFER_READ_BIT,
        )
        stages = vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | vk.VK_PIPELINE_STAGE_TRANSFER_BIT
        vk.vkCmdPipelineBarrier(self.cmd, stages, stages, 0, 1, [mb], 0, None, 0, None)

    def copy(self, src: Buffer, dst: Buffer, nbytes: int, dst_offset: int = 0) -> None:
        vk = self.vk
        region = vk.VkBufferCopy(srcOffset=0, dstOffset=dst_offset, size=nbytes)
        vk.vkCmdCopyBuffer(self.cmd, src.handle, dst.handle, 1, [region])

    def timestamp(self) -> int:
        """Write a timestamp after all earlier work; returns its index."""
        if self.n_ts >= self.max_ts:
            raise ValueError("more timestamps than reserved by commands(max_timestamps=...)")
        vk = self.vk
        vk.vkCmdWriteTimestamp(
            self.cmd, vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, self.dev._query_pool, self.n_ts
        )
        self.n_ts += 1
        return self.n_ts - 1

    def __exit__(self, exc_type, *exc):
        vk, dev = self.vk, self.dev
        vk.vkEndCommandBuffer(self.cmd)
        if exc_type is None:
            vk.vkResetFences(dev.device, 1, [dev.fence])
            vk.vkQueueSubmit(
                dev.queue, 1, [vk.VkSubmitInfo(commandBufferCount=1, pCommandBuffers=[self.cmd])], dev.fence
            )
            vk.vkWaitForFences(dev.device, 1, [dev.fence], vk.VK_TRUE, 600 * 10**9)
            if self.n_ts:
                data = vk.ffi.new("uint64_t[]", self.n_ts)
                vk.vkGetQueryPoolResults(
                    dev.device, dev._query_pool, 0, self.n_ts, 8 * self.n_ts, data, 8,
                    vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT,
                )
                self.ticks = [int(data[i]) for i in range(self.n_ts)]
        vk.vkFreeCommandBuffers(dev.device, dev.cmd_pool, 1, [self.cmd])
        return False

    def elapsed_ns(self, start: int, end: int) -> float:
        return (self.ticks[end] - self.ticks[start]) * self.dev.timestamp_period_ns


def pack_push(fmt: str, *values) -> bytes:
    """Push constants as std430-like little-endian scalars (``i``/``I``/``f``)."""
    return struct.pack("<" + fmt, *values)
