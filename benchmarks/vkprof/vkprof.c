/*
 * vkprof: a measuring stand-in for the Vulkan loader (libvulkan.so.1).
 *
 * A program that opens the loader at run time (ExecuTorch's Vulkan backend does, through volk) picks this
 * library up when its folder comes first on LD_LIBRARY_PATH. It opens the real loader named by
 * VKPROF_REAL_LOADER, hands every call through, and watches the calls that make up an execution:
 *
 *   - command-buffer recording (vkBeginCommandBuffer .. vkEndCommandBuffer): CPU time spent encoding, the
 *     dispatches, pipeline barriers and push-constant updates recorded;
 *   - vkQueueSubmit: CPU time in the call, and which recorded buffers (so how many dispatches) ran;
 *   - vkWaitForFences: CPU time blocked on the GPU. A fence wait ends one execution ("step");
 *   - with VKPROF_SAMPLE_HZ=N, the program counter N times a CPU-second (SIGPROF), with what the program was
 *     doing by the calls above (host work, encoding, submitting, waiting): at exit each sample is named by its
 *     library and, where the library exports one, its function (dladdr), to tell copies (libc) from the
 *     runtime's own code (the program) and the driver;
 *   - with VKPROF_TIMESTAMPS=1, a GPU timestamp (bottom of pipe) at the start of every recorded command buffer
 *     and after every dispatch, read back after the step's fence: the GPU's time from one dispatch's end to
 *     the next one's, which includes the barrier and the launch, as the graph experiences it.
 *
 * At exit it writes one JSON document to VKPROF_OUT (default vkprof.json): the pipelines created, and a record
 * per step (host gap since the previous step's fence, encode, submit and wait times, dispatches run, whether
 * the step re-encoded, GPU span and per-dispatch times when timestamps are on).
 *
 * It is a measuring tool for benchmarks, not part of the product: single-threaded use of one device.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <sys/time.h>
#include <ucontext.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <vulkan/vulkan.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_CMDBUFS 64
#define QUERIES_PER_CMDBUF 4096
#define MAX_STEPS 100000
#define MAX_PIPELINES 4096
#define MAX_DISPATCH_RECORD 8192

static void *real_lib;
static PFN_vkGetInstanceProcAddr real_gipa;
static PFN_vkGetDeviceProcAddr real_gdpa;
static PFN_vkCreateDevice real_CreateDevice;
static PFN_vkGetPhysicalDeviceProperties real_GetPhysicalDeviceProperties;
static PFN_vkBeginCommandBuffer real_BeginCommandBuffer;
static PFN_vkEndCommandBuffer real_EndCommandBuffer;
static PFN_vkCmdDispatch real_CmdDispatch;
static PFN_vkCmdPipelineBarrier real_CmdPipelineBarrier;
static PFN_vkCmdPushConstants real_CmdPushConstants;
static PFN_vkCmdBindPipeline real_CmdBindPipeline;
static PFN_vkQueueSubmit real_QueueSubmit;
static PFN_vkWaitForFences real_WaitForFences;
static PFN_vkCreateComputePipelines real_CreateComputePipelines;
static PFN_vkCreateShaderModule real_CreateShaderModule;
static PFN_vkCreateQueryPool real_CreateQueryPool;
static PFN_vkCmdResetQueryPool real_CmdResetQueryPool;
static PFN_vkCmdWriteTimestamp real_CmdWriteTimestamp;
static PFN_vkGetQueryPoolResults real_GetQueryPoolResults;

static int timestamps_on;
static double ns_per_tick = 1.0;
static VkDevice the_device;
static VkQueryPool pool = VK_NULL_HANDLE;

/* what the program is doing, for the sampler */
enum { PH_HOST, PH_ENCODE, PH_SUBMIT, PH_WAIT, PH_N };
static volatile int phase = PH_HOST;
static const char *phase_names[PH_N] = {"host", "encode", "submit", "wait"};
#define MAX_SAMPLES (1 << 21)
static uintptr_t *sample_ip;
static unsigned char *sample_phase;
static volatile long n_samples;

static void on_sigprof(int sig, siginfo_t *si, void *uc_) {
  (void)sig; (void)si;
  ucontext_t *uc = uc_;
  long i = n_samples;
  if (i >= MAX_SAMPLES) return;
  sample_ip[i] = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
  sample_phase[i] = (unsigned char)phase;
  n_samples = i + 1;
}

static void start_sampler(void) {
  const char *hz_env = getenv("VKPROF_SAMPLE_HZ");
  int hz = hz_env ? atoi(hz_env) : 0;
  if (hz <= 0) return;
  sample_ip = calloc(MAX_SAMPLES, sizeof *sample_ip);
  sample_phase = calloc(MAX_SAMPLES, 1);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigprof;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigaction(SIGPROF, &sa, NULL);
  struct itimerval it;
  it.it_interval.tv_sec = 0;
  it.it_interval.tv_usec = 1000000 / hz;
  it.it_value = it.it_interval;
  setitimer(ITIMER_PROF, &it, NULL);
}

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* ---- pipelines and shader modules: an id each, the SPIR-V size and a hash to tell them apart ---- */
typedef struct { uint64_t handle; uint32_t words; uint64_t hash; char names[160]; } module_t;
typedef struct { uint64_t handle; uint32_t words; uint64_t hash; uint32_t spec[3]; const char *names; } pipeline_t;
static module_t modules[MAX_PIPELINES];
static int n_modules;
static pipeline_t pipelines[MAX_PIPELINES];
static int n_pipelines;

static int pipeline_id(uint64_t h) {
  for (int i = n_pipelines - 1; i >= 0; i--)
    if (pipelines[i].handle == h) return i;
  return -1;
}

/* ---- command buffers as recorded ---- */
typedef struct {
  VkCommandBuffer cmd;
  int slot;             /* query range [slot * QUERIES_PER_CMDBUF, ...) */
  int recording;
  int dispatches, barriers, push_constants;
  int queries;          /* timestamps written */
  int bound_pipeline;
  int disp_pipeline[QUERIES_PER_CMDBUF];
  uint32_t disp_groups[QUERIES_PER_CMDBUF][3];
  double encode_start;
} cmdbuf_t;
static cmdbuf_t cmdbufs[MAX_CMDBUFS];
static int n_cmdbufs;

static cmdbuf_t *cmdbuf_of(VkCommandBuffer cmd, int create) {
  for (int i = 0; i < n_cmdbufs; i++)
    if (cmdbufs[i].cmd == cmd) return &cmdbufs[i];
  if (!create || n_cmdbufs == MAX_CMDBUFS) return NULL;
  cmdbuf_t *c = &cmdbufs[n_cmdbufs];
  memset(c, 0, sizeof *c);
  c->cmd = cmd;
  c->slot = n_cmdbufs++;
  c->bound_pipeline = -1;
  return c;
}

/* ---- steps ---- */
typedef struct {
  double host_gap_us, encode_us, submit_us, wait_us;
  int submits, cmdbufs, dispatches, barriers, push_constants, encoded_dispatches, reencoded;
  double gpu_span_us;
  int n_detail;         /* per-dispatch entries kept in detail[] */
  long detail_at;
} step_t;
static step_t *steps;
static int n_steps;
static step_t cur;
static double last_wait_end = -1;
static double first_submit_at = -1;
static cmdbuf_t *submitted[MAX_CMDBUFS];
static int n_submitted;
/* per-dispatch details for every step with timestamps: pipeline, groups, gpu ns */
typedef struct { int pipeline; uint32_t gx, gy, gz; float gpu_us; } detail_t;
static detail_t *details;
static long n_details, cap_details;
static const char *detail_steps_env;

static void read_maps(void);

static void load_real(void) {
  if (real_lib) return;
  const char *path = getenv("VKPROF_REAL_LOADER");
  real_lib = dlopen(path && *path ? path : "/usr/lib/x86_64-linux-gnu/libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!real_lib) {
    fprintf(stderr, "vkprof: cannot open the real Vulkan loader (VKPROF_REAL_LOADER): %s\n", dlerror());
    abort();
  }
  real_gipa = (PFN_vkGetInstanceProcAddr)dlsym(real_lib, "vkGetInstanceProcAddr");
  timestamps_on = getenv("VKPROF_TIMESTAMPS") && atoi(getenv("VKPROF_TIMESTAMPS"));
  detail_steps_env = getenv("VKPROF_DETAIL_STEPS");
  steps = calloc(MAX_STEPS, sizeof(step_t));
  start_sampler();
}

static PFN_vkVoidFunction wrap(const char *name, PFN_vkVoidFunction real);

static VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL my_GetDeviceProcAddr(VkDevice dev, const char *name) {
  return wrap(name, real_gdpa(dev, name));
}

static VKAPI_ATTR VkResult VKAPI_CALL my_CreateDevice(VkPhysicalDevice phys, const VkDeviceCreateInfo *info,
                                                      const VkAllocationCallbacks *alloc, VkDevice *dev) {
  VkResult r = real_CreateDevice(phys, info, alloc, dev);
  if (r != VK_SUCCESS) return r;
  the_device = *dev;
  VkPhysicalDeviceProperties props;
  real_GetPhysicalDeviceProperties(phys, &props);
  ns_per_tick = props.limits.timestampPeriod;
  /* fetch what the wrappers call, whether or not the program asks for it */
  if (!real_gdpa) real_gdpa = (PFN_vkGetDeviceProcAddr)dlsym(real_lib, "vkGetDeviceProcAddr");
#define DEV(fn) real_##fn = (PFN_vk##fn)real_gdpa(*dev, "vk" #fn)
  DEV(BeginCommandBuffer); DEV(EndCommandBuffer); DEV(CmdDispatch); DEV(CmdPipelineBarrier);
  DEV(CmdPushConstants); DEV(CmdBindPipeline); DEV(QueueSubmit); DEV(WaitForFences);
  DEV(CreateComputePipelines); DEV(CreateShaderModule); DEV(CreateQueryPool); DEV(CmdResetQueryPool);
  DEV(CmdWriteTimestamp); DEV(GetQueryPoolResults);
#undef DEV
  if (timestamps_on) {
    VkQueryPoolCreateInfo qi = {VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO};
    qi.queryType = VK_QUERY_TYPE_TIMESTAMP;
    qi.queryCount = MAX_CMDBUFS * QUERIES_PER_CMDBUF;
    if (real_CreateQueryPool(*dev, &qi, NULL, &pool) != VK_SUCCESS) {
      fprintf(stderr, "vkprof: no timestamp query pool; timestamps off\n");
      timestamps_on = 0;
    }
  }
  return r;
}

static uint64_t fnv(const void *p, size_t n) {
  const uint8_t *b = p;
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ULL;
  return h;
}

/* The names the shader gave its tensors ("t_out", "t_qmat2", ...): OpName strings that start with "t_". */
static void spirv_names(const uint32_t *code, size_t words, char *out, size_t cap) {
  size_t used = 0;
  out[0] = 0;
  for (size_t i = 5; i < words;) {
    uint32_t count = code[i] >> 16, op = code[i] & 0xffff;
    if (count == 0) break;
    if (op == 5 && count > 2) {   /* OpName <id> "string" */
      const char *str = (const char *)&code[i + 2];
      size_t len = strnlen(str, (count - 2) * 4);
      if (len > 2 && str[0] == 't' && str[1] == '_' && used + len + 2 < cap) {
        if (used) out[used++] = ' ';
        memcpy(out + used, str, len);
        used += len;
        out[used] = 0;
      }
    }
    i += count;
  }
}

static VKAPI_ATTR VkResult VKAPI_CALL my_CreateShaderModule(VkDevice dev, const VkShaderModuleCreateInfo *info,
                                                            const VkAllocationCallbacks *alloc, VkShaderModule *m) {
  VkResult r = real_CreateShaderModule(dev, info, alloc, m);
  if (r == VK_SUCCESS && n_modules < MAX_PIPELINES) {
    modules[n_modules].handle = (uint64_t)*m;
    modules[n_modules].words = info->codeSize / 4;
    modules[n_modules].hash = fnv(info->pCode, info->codeSize);
    spirv_names(info->pCode, info->codeSize / 4, modules[n_modules].names, sizeof modules[n_modules].names);
    n_modules++;
  }
  return r;
}

static VKAPI_ATTR VkResult VKAPI_CALL my_CreateComputePipelines(VkDevice dev, VkPipelineCache cache, uint32_t n,
                                                                const VkComputePipelineCreateInfo *infos,
                                                                const VkAllocationCallbacks *alloc, VkPipeline *out) {
  VkResult r = real_CreateComputePipelines(dev, cache, n, infos, alloc, out);
  if (r != VK_SUCCESS) return r;
  for (uint32_t i = 0; i < n && n_pipelines < MAX_PIPELINES; i++) {
    pipeline_t *p = &pipelines[n_pipelines++];
    p->handle = (uint64_t)out[i];
    uint64_t mh = (uint64_t)infos[i].stage.module;
    for (int k = n_modules - 1; k >= 0; k--)
      if (modules[k].handle == mh) {
        p->words = modules[k].words; p->hash = modules[k].hash; p->names = modules[k].names;
        break;
      }
    const VkSpecializationInfo *sp = infos[i].stage.pSpecializationInfo;
    memset(p->spec, 0, sizeof p->spec);
    if (sp && sp->pData) memcpy(p->spec, sp->pData, sp->dataSize < sizeof p->spec ? sp->dataSize : sizeof p->spec);
  }
  return r;
}

static VKAPI_ATTR VkResult VKAPI_CALL my_BeginCommandBuffer(VkCommandBuffer cmd, const VkCommandBufferBeginInfo *info) {
  VkResult r = real_BeginCommandBuffer(cmd, info);
  cmdbuf_t *c = cmdbuf_of(cmd, 1);
  if (c) {
    c->recording = 1;
    c->dispatches = c->barriers = c->push_constants = c->queries = 0;
    c->encode_start = now_us();
    phase = PH_ENCODE;
    if (timestamps_on) {
      real_CmdResetQueryPool(cmd, pool, c->slot * QUERIES_PER_CMDBUF, QUERIES_PER_CMDBUF);
      real_CmdWriteTimestamp(cmd, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, pool, c->slot * QUERIES_PER_CMDBUF);
      c->queries = 1;
    }
  }
  return r;
}

static VKAPI_ATTR VkResult VKAPI_CALL my_EndCommandBuffer(VkCommandBuffer cmd) {
  cmdbuf_t *c = cmdbuf_of(cmd, 0);
  if (c && c->recording) {
    c->recording = 0;
    cur.encode_us += now_us() - c->encode_start;
    cur.encoded_dispatches += c->dispatches;
    cur.reencoded = 1;
  }
  VkResult r = real_EndCommandBuffer(cmd);
  phase = PH_HOST;
  return r;
}

static VKAPI_ATTR void VKAPI_CALL my_CmdBindPipeline(VkCommandBuffer cmd, VkPipelineBindPoint bp, VkPipeline p) {
  cmdbuf_t *c = cmdbuf_of(cmd, 0);
  if (c) c->bound_pipeline = pipeline_id((uint64_t)p);
  real_CmdBindPipeline(cmd, bp, p);
}

static VKAPI_ATTR void VKAPI_CALL my_CmdDispatch(VkCommandBuffer cmd, uint32_t x, uint32_t y, uint32_t z) {
  real_CmdDispatch(cmd, x, y, z);
  cmdbuf_t *c = cmdbuf_of(cmd, 0);
  if (!c) return;
  if (c->dispatches < QUERIES_PER_CMDBUF - 2) {
    c->disp_pipeline[c->dispatches] = c->bound_pipeline;
    c->disp_groups[c->dispatches][0] = x;
    c->disp_groups[c->dispatches][1] = y;
    c->disp_groups[c->dispatches][2] = z;
    if (timestamps_on) {
      real_CmdWriteTimestamp(cmd, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, pool,
                             c->slot * QUERIES_PER_CMDBUF + c->queries);
      c->queries++;
    }
  }
  c->dispatches++;
}

static VKAPI_ATTR void VKAPI_CALL my_CmdPipelineBarrier(VkCommandBuffer cmd, VkPipelineStageFlags s, VkPipelineStageFlags d,
                                                        VkDependencyFlags f, uint32_t nm, const VkMemoryBarrier *m,
                                                        uint32_t nb, const VkBufferMemoryBarrier *b, uint32_t ni,
                                                        const VkImageMemoryBarrier *im) {
  cmdbuf_t *c = cmdbuf_of(cmd, 0);
  if (c) c->barriers++;
  real_CmdPipelineBarrier(cmd, s, d, f, nm, m, nb, b, ni, im);
}

static VKAPI_ATTR void VKAPI_CALL my_CmdPushConstants(VkCommandBuffer cmd, VkPipelineLayout l, VkShaderStageFlags st,
                                                      uint32_t off, uint32_t size, const void *v) {
  cmdbuf_t *c = cmdbuf_of(cmd, 0);
  if (c) c->push_constants++;
  real_CmdPushConstants(cmd, l, st, off, size, v);
}

static VKAPI_ATTR VkResult VKAPI_CALL my_QueueSubmit(VkQueue q, uint32_t n, const VkSubmitInfo *si, VkFence f) {
  double t0 = now_us();
  if (first_submit_at < 0) first_submit_at = t0;
  int was = phase;
  phase = PH_SUBMIT;
  VkResult r = real_QueueSubmit(q, n, si, f);
  phase = was;
  cur.submit_us += now_us() - t0;
  cur.submits++;
  for (uint32_t i = 0; i < n; i++)
    for (uint32_t k = 0; k < si[i].commandBufferCount; k++) {
      cmdbuf_t *c = cmdbuf_of(si[i].pCommandBuffers[k], 0);
      if (!c) continue;
      cur.cmdbufs++;
      cur.dispatches += c->dispatches;
      cur.barriers += c->barriers;
      cur.push_constants += c->push_constants;
      if (n_submitted < MAX_CMDBUFS) submitted[n_submitted++] = c;
    }
  return r;
}

static int want_detail(int step) {
  if (!detail_steps_env) return 1;
  int a = 0, b = -1;
  if (sscanf(detail_steps_env, "%d-%d", &a, &b) == 2) return step >= a && step <= b;
  return 0;
}

static void read_timestamps(step_t *s) {
  uint64_t vals[QUERIES_PER_CMDBUF];
  double first = -1, last = -1;
  int keep = want_detail(n_steps);
  s->detail_at = n_details;
  for (int i = 0; i < n_submitted; i++) {
    cmdbuf_t *c = submitted[i];
    if (c->queries < 1) continue;
    VkResult r = real_GetQueryPoolResults(the_device, pool, c->slot * QUERIES_PER_CMDBUF, c->queries,
                                          sizeof(vals), vals, sizeof(uint64_t),
                                          VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT);
    if (r != VK_SUCCESS) continue;
    double t_begin = vals[0] * ns_per_tick / 1e3;
    if (first < 0) first = t_begin;
    double prev = t_begin;
    for (int k = 1; k < c->queries; k++) {
      double t = vals[k] * ns_per_tick / 1e3;
      if (keep) {
        if (n_details == cap_details) {
          cap_details = cap_details ? cap_details * 2 : 65536;
          details = realloc(details, cap_details * sizeof(detail_t));
        }
        detail_t *d = &details[n_details++];
        d->pipeline = c->disp_pipeline[k - 1];
        d->gx = c->disp_groups[k - 1][0];
        d->gy = c->disp_groups[k - 1][1];
        d->gz = c->disp_groups[k - 1][2];
        d->gpu_us = (float)(t - prev);
        s->n_detail++;
      }
      prev = t;
    }
    last = prev;
  }
  s->gpu_span_us = (first >= 0 && last >= first) ? last - first : 0;
}

static VKAPI_ATTR VkResult VKAPI_CALL my_WaitForFences(VkDevice dev, uint32_t n, const VkFence *f, VkBool32 all,
                                                       uint64_t timeout) {
  double t0 = now_us();
  phase = PH_WAIT;
  VkResult r = real_WaitForFences(dev, n, f, all, timeout);
  phase = PH_HOST;
  double t1 = now_us();
  if (cur.submits == 0 || n_steps >= MAX_STEPS) return r;   /* not an execution */
  cur.wait_us += t1 - t0;              /* the runtime waits in a loop of short timeouts */
  if (r != VK_SUCCESS) return r;
  cur.host_gap_us = last_wait_end < 0 ? -1 : first_submit_at - last_wait_end -
                                              cur.encode_us; /* CPU before the first submit, encoding excluded */
  if (timestamps_on) read_timestamps(&cur);
  steps[n_steps++] = cur;
  if (n_steps == 3 && sample_ip) read_maps();   /* while the driver is loaded */
  memset(&cur, 0, sizeof cur);
  n_submitted = 0;
  first_submit_at = -1;
  last_wait_end = now_us();
  return r;
}

static PFN_vkVoidFunction wrap(const char *name, PFN_vkVoidFunction real) {
  if (!real || !name) return real;
#define W(fn) if (!strcmp(name, "vk" #fn)) { if (!real_##fn) real_##fn = (PFN_vk##fn)real; return (PFN_vkVoidFunction)my_##fn; }
  W(CreateDevice); W(BeginCommandBuffer); W(EndCommandBuffer); W(CmdDispatch); W(CmdPipelineBarrier);
  W(CmdPushConstants); W(CmdBindPipeline); W(QueueSubmit); W(WaitForFences); W(CreateComputePipelines);
  W(CreateShaderModule);
#undef W
  if (!strcmp(name, "vkGetDeviceProcAddr")) {
    if (!real_gdpa) real_gdpa = (PFN_vkGetDeviceProcAddr)real;
    return (PFN_vkVoidFunction)my_GetDeviceProcAddr;
  }
  return real;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetInstanceProcAddr(VkInstance inst, const char *name) {
  load_real();
  PFN_vkVoidFunction real = real_gipa(inst, name);
  if (inst && !real_GetPhysicalDeviceProperties)
    real_GetPhysicalDeviceProperties = (PFN_vkGetPhysicalDeviceProperties)real_gipa(inst, "vkGetPhysicalDeviceProperties");
  return wrap(name, real);
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice dev, const char *name) {
  load_real();
  if (!real_gdpa) real_gdpa = (PFN_vkGetDeviceProcAddr)dlsym(real_lib, "vkGetDeviceProcAddr");
  return wrap(name, real_gdpa(dev, name));
}

/* The file mapped at an address (from /proc/self/maps), for addresses dladdr cannot name (the program). */
static char maps_names[256][128];
static uintptr_t maps_lo[256], maps_hi[256], maps_off[256];
static int n_maps = -1;

static void read_maps(void) {
  {
    n_maps = 0;
    FILE *m = fopen("/proc/self/maps", "r");
    char line[512];
    while (m && n_maps < 256 && fgets(line, sizeof line, m)) {
      unsigned long lo, hi, off;
      char perms[8], path[400] = "";
      if (sscanf(line, "%lx-%lx %7s %lx %*s %*s %399s", &lo, &hi, perms, &off, path) >= 4 && perms[2] == 'x') {
        maps_lo[n_maps] = lo; maps_hi[n_maps] = hi; maps_off[n_maps] = off;
        const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
        snprintf(maps_names[n_maps], sizeof maps_names[n_maps], "%s", *base ? base : "[anonymous]");
        n_maps++;
      }
    }
    if (m) fclose(m);
  }
}

static const char *mapping_of(uintptr_t ip, uintptr_t *block) {
  if (n_maps < 0) read_maps();
  for (int k = 0; k < n_maps; k++)
    if (ip >= maps_lo[k] && ip < maps_hi[k]) {
      *block = (ip - maps_lo[k] + maps_off[k]) >> 16;
      return maps_names[k];
    }
  return "?";
}

__attribute__((destructor)) static void dump(void) {
  if (!steps) return;
  const char *path = getenv("VKPROF_OUT");
  FILE *f = fopen(path && *path ? path : "vkprof.json", "w");
  if (!f) return;
  fprintf(f, "{\"timestamps\": %d, \"ns_per_tick\": %g,\n \"pipelines\": [", timestamps_on, ns_per_tick);
  for (int i = 0; i < n_pipelines; i++)
    fprintf(f, "%s\n  {\"words\": %u, \"hash\": \"%016llx\", \"spec\": [%u, %u, %u], \"tensors\": \"%s\"}",
            i ? "," : "", pipelines[i].words, (unsigned long long)pipelines[i].hash, pipelines[i].spec[0],
            pipelines[i].spec[1], pipelines[i].spec[2], pipelines[i].names ? pipelines[i].names : "");
  fprintf(f, "],\n \"steps\": [\n");
  for (int i = 0; i < n_steps; i++) {
    step_t *s = &steps[i];
    fprintf(f, "  {\"host_gap_us\": %.2f, \"encode_us\": %.2f, \"submit_us\": %.2f, \"wait_us\": %.2f, "
               "\"submits\": %d, \"cmdbufs\": %d, \"dispatches\": %d, \"barriers\": %d, \"push_constants\": %d, "
               "\"reencoded\": %d, \"encoded_dispatches\": %d, \"gpu_span_us\": %.2f, \"dispatch\": [",
            s->host_gap_us, s->encode_us, s->submit_us, s->wait_us, s->submits, s->cmdbufs, s->dispatches,
            s->barriers, s->push_constants, s->reencoded, s->encoded_dispatches, s->gpu_span_us);
    for (int k = 0; k < s->n_detail; k++) {
      detail_t *d = &details[s->detail_at + k];
      fprintf(f, "%s[%d, %u, %u, %u, %.3f]", k ? ", " : "", d->pipeline, d->gx, d->gy, d->gz, d->gpu_us);
    }
    fprintf(f, "]}%s\n", i + 1 < n_steps ? "," : "");
  }
  fprintf(f, " ],\n \"samples\": [");
  /* name each sample: phase, library, exported function (or the offset's 64 KiB block in a stripped file) */
  typedef struct { int ph; const char *lib; const char *sym; uintptr_t block; long count; } bucket_t;
  static bucket_t buckets[4096];
  int n_buckets = 0;
  long total = n_samples;
  /* libc's copy routines are not exported under their own names: name the 64 KiB block memcpy resolved to */
  Dl_info mc;
  void *memcpy_at = dlsym(RTLD_DEFAULT, "memcpy");
  const void *memcpy_base = memcpy_at && dladdr(memcpy_at, &mc) ? mc.dli_fbase : NULL;
  uintptr_t memcpy_block = memcpy_base ? ((uintptr_t)memcpy_at - (uintptr_t)memcpy_base) >> 16 : 0;
  for (long i = 0; i < total; i++) {
    Dl_info info;
    const char *lib = "?", *sym = "";
    uintptr_t block = 0;
    if (!dladdr((void *)sample_ip[i], &info) || !info.dli_fname || !*info.dli_fname) {
      lib = mapping_of(sample_ip[i], &block);
    } else {
      lib = strrchr(info.dli_fname, '/') ? strrchr(info.dli_fname, '/') + 1 : info.dli_fname;
      if (info.dli_sname) sym = info.dli_sname;
      else block = (sample_ip[i] - (uintptr_t)info.dli_fbase) >> 16;
      if (!info.dli_sname && memcpy_base == info.dli_fbase && block == memcpy_block) sym = "memcpy (its 64 KiB block)";
    }
    int k;
    for (k = 0; k < n_buckets; k++)
      if (buckets[k].ph == sample_phase[i] && buckets[k].block == block && !strcmp(buckets[k].lib, lib) &&
          !strcmp(buckets[k].sym, sym))
        break;
    if (k == n_buckets) {
      if (n_buckets == 4096) continue;
      buckets[k].ph = sample_phase[i]; buckets[k].lib = lib; buckets[k].sym = sym; buckets[k].block = block;
      buckets[k].count = 0;
      n_buckets++;
    }
    buckets[k].count++;
  }
  for (int k = 0; k < n_buckets; k++)
    fprintf(f, "%s\n  [\"%s\", \"%s\", \"%s\", %lu, %ld]", k ? "," : "", phase_names[buckets[k].ph], buckets[k].lib,
            buckets[k].sym, (unsigned long)buckets[k].block, buckets[k].count);
  fprintf(f, "]}\n");
  fclose(f);
}
