// A Vulkan layer that prints what the driver's compiler made of each compute pipeline: the
// statistics of VK_KHR_pipeline_executable_properties (on NVIDIA: registers, code size, ...).
// Why: ncu does not profile Vulkan and the device machine has no Vulkan profiler, yet the
// registers and shared memory the driver gives a kernel decide how many cubes an SM keeps
// resident (docs/PERF-NOTES.md, "Vulkan: robust buffer access is not the gap", uses it to
// compare the attention kernel's registers on Vulkan and CUDA and across a sweep of its
// plan). wgpu and CubeCL cannot be asked for it, so the layer enables the
// extension at vkCreateDevice, asks every vkCreateComputePipelines for its statistics, and
// prints one line per pipeline executable: the entry point (CubeCL's SPIR-V names it after
// the kernel), the shader's size, and every statistic. (NVIDIA's driver reports registers,
// binary size, stack, local and shared memory, and offers no internal representation.)
//
// Build (`scripts/gpu.sh --vulkan` does, into .gpu/vk, with the JSON manifest; the session
// script's VULKAN part uses it):
//   gcc -O2 -Wall -shared -fPIC -fvisibility=hidden -o libsparsekv_pipeline_stats.so scripts/vk_pipeline_stats.c
// Use: VK_LAYER_PATH=<dir with the .so and the JSON manifest>
//      VK_INSTANCE_LAYERS=VK_LAYER_SPARSEKV_pipeline_stats <program>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vk_layer.h>
#include <vulkan/vulkan.h>

#define EXPORT __attribute__((visibility("default")))
#define TAG "VK_LAYER_SPARSEKV_pipeline_stats"
#define EXTENSION VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME

// One instance and one device per process is all the benches create.
static PFN_vkGetInstanceProcAddr next_instance_proc;
static VkInstance the_instance;
static PFN_vkGetDeviceProcAddr next_device_proc;
static PFN_vkCreateComputePipelines next_create_pipelines;
static PFN_vkCreateShaderModule next_create_module;
static PFN_vkGetPipelineExecutablePropertiesKHR executable_properties;
static PFN_vkGetPipelineExecutableStatisticsKHR executable_statistics;
// Whether the device was created with the extension (the driver may not have it).
static int capturing;

// SPIR-V size of each shader module, to tell the pipelines apart in the report.
static struct {
    VkShaderModule module;
    size_t bytes;
} modules[1024];
static size_t module_count;

static VKAPI_ATTR VkResult VKAPI_CALL create_instance(const VkInstanceCreateInfo *info,
                                                     const VkAllocationCallbacks *alloc,
                                                     VkInstance *instance) {
    VkLayerInstanceCreateInfo *link = (VkLayerInstanceCreateInfo *)info->pNext;
    while (link && !(link->sType == VK_STRUCTURE_TYPE_LOADER_INSTANCE_CREATE_INFO &&
                     link->function == VK_LAYER_LINK_INFO))
        link = (VkLayerInstanceCreateInfo *)link->pNext;
    if (!link)
        return VK_ERROR_INITIALIZATION_FAILED;
    next_instance_proc = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
    link->u.pLayerInfo = link->u.pLayerInfo->pNext;
    PFN_vkCreateInstance next = (PFN_vkCreateInstance)next_instance_proc(NULL, "vkCreateInstance");
    VkResult result = next(info, alloc, instance);
    if (result == VK_SUCCESS)
        the_instance = *instance;
    return result;
}

// Whether the physical device offers the extension.
static int has_extension(VkPhysicalDevice gpu) {
    // An instance-level function: looked up for the instance (a null one answers only the
    // global functions).
    PFN_vkEnumerateDeviceExtensionProperties list =
        (PFN_vkEnumerateDeviceExtensionProperties)next_instance_proc(the_instance, "vkEnumerateDeviceExtensionProperties");
    uint32_t count = 0;
    if (!list || list(gpu, NULL, &count, NULL) != VK_SUCCESS)
        return 0;
    VkExtensionProperties *all = calloc(count, sizeof *all);
    int found = 0;
    if (all && list(gpu, NULL, &count, all) == VK_SUCCESS)
        for (uint32_t i = 0; i < count && !found; i++)
            found = !strcmp(all[i].extensionName, EXTENSION);
    free(all);
    return found;
}

static VKAPI_ATTR VkResult VKAPI_CALL create_device(VkPhysicalDevice gpu, const VkDeviceCreateInfo *info,
                                                   const VkAllocationCallbacks *alloc, VkDevice *device) {
    VkLayerDeviceCreateInfo *link = (VkLayerDeviceCreateInfo *)info->pNext;
    while (link && !(link->sType == VK_STRUCTURE_TYPE_LOADER_DEVICE_CREATE_INFO &&
                     link->function == VK_LAYER_LINK_INFO))
        link = (VkLayerDeviceCreateInfo *)link->pNext;
    if (!link)
        return VK_ERROR_INITIALIZATION_FAILED;
    PFN_vkGetInstanceProcAddr gipa = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
    next_device_proc = link->u.pLayerInfo->pfnNextGetDeviceProcAddr;
    link->u.pLayerInfo = link->u.pLayerInfo->pNext;
    PFN_vkCreateDevice next = (PFN_vkCreateDevice)gipa(VK_NULL_HANDLE, "vkCreateDevice");
    if (!has_extension(gpu)) {
        fprintf(stderr, TAG ": the device has no " EXTENSION "; no statistics\n");
        return next(gpu, info, alloc, device);
    }
    // The caller's create info with the extension and its feature added.
    VkDeviceCreateInfo ours = *info;
    const char **names = calloc(info->enabledExtensionCount + 1, sizeof *names);
    if (!names)
        return VK_ERROR_OUT_OF_HOST_MEMORY;
    int enabled = 0;
    for (uint32_t i = 0; i < info->enabledExtensionCount; i++) {
        names[i] = info->ppEnabledExtensionNames[i];
        enabled |= !strcmp(names[i], EXTENSION);
    }
    ours.enabledExtensionCount = info->enabledExtensionCount + !enabled;
    if (!enabled)
        names[info->enabledExtensionCount] = EXTENSION;
    ours.ppEnabledExtensionNames = names;
    VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR feature = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR,
        .pNext = (void *)info->pNext,
        .pipelineExecutableInfo = VK_TRUE,
    };
    ours.pNext = &feature;
    VkResult result = next(gpu, &ours, alloc, device);
    free(names);
    if (result == VK_SUCCESS) {
        executable_properties = (PFN_vkGetPipelineExecutablePropertiesKHR)next_device_proc(*device, "vkGetPipelineExecutablePropertiesKHR");
        executable_statistics = (PFN_vkGetPipelineExecutableStatisticsKHR)next_device_proc(*device, "vkGetPipelineExecutableStatisticsKHR");
        capturing = executable_properties && executable_statistics;
        fprintf(stderr, TAG ": %s\n", capturing ? "capturing compute pipeline statistics" : "the extension's functions are missing");
    }
    return result;
}

static VKAPI_ATTR VkResult VKAPI_CALL create_module(VkDevice device, const VkShaderModuleCreateInfo *info,
                                                   const VkAllocationCallbacks *alloc, VkShaderModule *module) {
    VkResult result = next_create_module(device, info, alloc, module);
    if (result == VK_SUCCESS && module_count < sizeof modules / sizeof modules[0]) {
        modules[module_count].module = *module;
        modules[module_count++].bytes = info->codeSize;
    }
    return result;
}

static size_t module_bytes(VkShaderModule module) {
    for (size_t i = 0; i < module_count; i++)
        if (modules[i].module == module)
            return modules[i].bytes;
    return 0;
}

static void print_value(const VkPipelineExecutableStatisticKHR *s) {
    switch (s->format) {
    case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR: fprintf(stderr, "%s", s->value.b32 ? "true" : "false"); break;
    case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR: fprintf(stderr, "%lld", (long long)s->value.i64); break;
    case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR: fprintf(stderr, "%llu", (unsigned long long)s->value.u64); break;
    case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_FLOAT64_KHR: fprintf(stderr, "%g", s->value.f64); break;
    default: fprintf(stderr, "?"); break;
    }
}

// One line per executable of the pipeline: entry point, SPIR-V bytes, every statistic.
static void report(VkDevice device, VkPipeline pipeline, const VkComputePipelineCreateInfo *info) {
    static unsigned reported;
    unsigned index = reported++;
    VkPipelineInfoKHR which = {.sType = VK_STRUCTURE_TYPE_PIPELINE_INFO_KHR, .pipeline = pipeline};
    uint32_t count = 0;
    if (executable_properties(device, &which, &count, NULL) != VK_SUCCESS)
        return;
    VkPipelineExecutablePropertiesKHR *props = calloc(count, sizeof *props);
    if (!props)
        return;
    for (uint32_t i = 0; i < count; i++)
        props[i].sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_PROPERTIES_KHR;
    if (executable_properties(device, &which, &count, props) == VK_SUCCESS)
        for (uint32_t e = 0; e < count; e++) {
            VkPipelineExecutableInfoKHR exe = {.sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INFO_KHR,
                                               .pipeline = pipeline, .executableIndex = e};
            uint32_t n = 0;
            if (executable_statistics(device, &exe, &n, NULL) != VK_SUCCESS)
                continue;
            VkPipelineExecutableStatisticKHR *stats = calloc(n, sizeof *stats);
            if (!stats)
                continue;
            for (uint32_t i = 0; i < n; i++)
                stats[i].sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_STATISTIC_KHR;
            if (executable_statistics(device, &exe, &n, stats) == VK_SUCCESS) {
                fprintf(stderr, TAG ": pipeline %u '%s' (%zu bytes of SPIR-V), %s, subgroup %u:", index,
                        info->stage.pName, module_bytes(info->stage.module), props[e].name, props[e].subgroupSize);
                for (uint32_t i = 0; i < n; i++) {
                    fprintf(stderr, "%s %s = ", i ? ";" : "", stats[i].name);
                    print_value(&stats[i]);
                }
                fprintf(stderr, "\n");
            }
            free(stats);
        }
    free(props);
}

static VKAPI_ATTR VkResult VKAPI_CALL create_pipelines(VkDevice device, VkPipelineCache cache, uint32_t count,
                                                      const VkComputePipelineCreateInfo *infos,
                                                      const VkAllocationCallbacks *alloc, VkPipeline *pipelines) {
    if (!capturing)
        return next_create_pipelines(device, cache, count, infos, alloc, pipelines);
    VkComputePipelineCreateInfo *ours = calloc(count, sizeof *ours);
    if (!ours)
        return VK_ERROR_OUT_OF_HOST_MEMORY;
    for (uint32_t i = 0; i < count; i++) {
        ours[i] = infos[i];
        ours[i].flags |= VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR;
    }
    VkResult result = next_create_pipelines(device, cache, count, ours, alloc, pipelines);
    if (result == VK_SUCCESS)
        for (uint32_t i = 0; i < count; i++)
            report(device, pipelines[i], &ours[i]);
    free(ours);
    return result;
}

static VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL device_proc(VkDevice device, const char *name);

// The layer's own lookups are static functions: an exported symbol's address taken inside the
// library could resolve to the loader's function of the same name, and the chain would call
// itself. The device-level functions this layer answers itself; the rest go to the next layer.
static VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL device_proc(VkDevice device, const char *name) {
    if (!strcmp(name, "vkGetDeviceProcAddr"))
        return (PFN_vkVoidFunction)device_proc;
    if (!strcmp(name, "vkCreateComputePipelines")) {
        next_create_pipelines = (PFN_vkCreateComputePipelines)next_device_proc(device, name);
        return (PFN_vkVoidFunction)create_pipelines;
    }
    if (!strcmp(name, "vkCreateShaderModule")) {
        next_create_module = (PFN_vkCreateShaderModule)next_device_proc(device, name);
        return (PFN_vkVoidFunction)create_module;
    }
    return next_device_proc(device, name);
}

static VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL instance_proc(VkInstance instance, const char *name);

// The instance-level functions this layer answers itself; the rest go to the next layer.
static const struct {
    const char *name;
    PFN_vkVoidFunction function;
} intercepted[] = {
    {"vkGetInstanceProcAddr", (PFN_vkVoidFunction)instance_proc},
    {"vkGetDeviceProcAddr", (PFN_vkVoidFunction)device_proc},
    {"vkCreateInstance", (PFN_vkVoidFunction)create_instance},
    {"vkCreateDevice", (PFN_vkVoidFunction)create_device},
};

static VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL instance_proc(VkInstance instance, const char *name) {
    for (size_t i = 0; i < sizeof intercepted / sizeof intercepted[0]; i++)
        if (!strcmp(name, intercepted[i].name))
            return intercepted[i].function;
    return next_instance_proc(instance, name);
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice device, const char *name) {
    return device_proc(device, name);
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetInstanceProcAddr(VkInstance instance, const char *name) {
    return instance_proc(instance, name);
}
