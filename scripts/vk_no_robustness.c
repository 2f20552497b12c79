// A Vulkan layer for one experiment: does the driver's robust buffer access cost the wgpu
// attention kernels their speed on NVIDIA? (docs/PERF-NOTES.md, "the 2026-12-07 predictions
// measured".) wgpu-hal enables `robustBufferAccess` (and `robustBufferAccess2` where
// VK_EXT_robustness2 exists) whenever the device supports it, and cubecl-wgpu enables every
// supported core feature, so neither can be asked to leave it off. This layer reports both
// features as unsupported and strips them from vkCreateDevice, so the same binary runs with
// and without them. CubeCL's kernels check their own bounds where they need to (its checked
// launches; ours are launched unchecked after the host validated every bound), so nothing
// relies on the driver's checks. With SPARSEKV_LAYER_LOG_ONLY set it changes nothing and
// reports what vkCreateDevice is asked for (to check sparsekv's own Vulkan device, which
// leaves both off by itself).
//
// Build (`scripts/gpu.sh --vulkan` does, into .gpu/vk, with the JSON manifest; the session
// script's VULKAN part uses it):
//   gcc -O2 -shared -fPIC -fvisibility=hidden -o libsparsekv_no_robustness.so scripts/vk_no_robustness.c
// Use: VK_LAYER_PATH=<dir with the .so and the JSON manifest>
//      VK_INSTANCE_LAYERS=VK_LAYER_SPARSEKV_no_robustness <program>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vk_layer.h>
#include <vulkan/vulkan.h>

#define EXPORT __attribute__((visibility("default")))

// One instance and one device per process is all the benches create.
static PFN_vkGetInstanceProcAddr next_instance_proc;
static PFN_vkGetDeviceProcAddr next_device_proc;
// With SPARSEKV_LAYER_LOG_ONLY set the layer changes nothing and only says, at vkCreateDevice,
// how many robustness features the application asked for (to check a device made elsewhere,
// such as sparsekv's own Vulkan device, which should ask for none).
static int log_only(void) { return getenv("SPARSEKV_LAYER_LOG_ONLY") != NULL; }

static PFN_vkGetPhysicalDeviceFeatures next_features;
static PFN_vkGetPhysicalDeviceFeatures2 next_features2;
// Clears the robustness features of a pNext chain (features queries and device creation use
// the same structures); returns how many were on.
static int clear_chain(void *chain, int clear) {
    int cleared = 0;
    for (VkBaseOutStructure *s = chain; s; s = s->pNext) {
        VkBool32 *flag = NULL;
        if (s->sType == VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2)
            flag = &((VkPhysicalDeviceFeatures2 *)s)->features.robustBufferAccess;
        else if (s->sType == VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_ROBUSTNESS_2_FEATURES_EXT)
            flag = &((VkPhysicalDeviceRobustness2FeaturesEXT *)s)->robustBufferAccess2;
        if (flag) {
            cleared += *flag == VK_TRUE;
            if (clear)
                *flag = VK_FALSE;
        }
    }
    return cleared;
}

static VKAPI_ATTR void VKAPI_CALL features(VkPhysicalDevice gpu, VkPhysicalDeviceFeatures *out) {
    next_features(gpu, out);
    if (!log_only())
        out->robustBufferAccess = VK_FALSE;
}

static VKAPI_ATTR void VKAPI_CALL features2(VkPhysicalDevice gpu, VkPhysicalDeviceFeatures2 *out) {
    static int logged;
    next_features2(gpu, out);
    if (log_only())
        return;
    int hidden = clear_chain(out, 1);
    if (!logged && hidden) {
        logged = 1;
        fprintf(stderr, "VK_LAYER_SPARSEKV_no_robustness: %d robustness features the driver supports "
                        "reported as unsupported\n", hidden);
    }
}

static VKAPI_ATTR void VKAPI_CALL features2_khr(VkPhysicalDevice gpu, VkPhysicalDeviceFeatures2 *out) {
    features2(gpu, out);
}

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
    // Resolved now, for this instance: asked later (or for the KHR alias), the next layer can
    // hand back the loader's trampoline, which would call this layer again.
    if (result == VK_SUCCESS) {
        next_features = (PFN_vkGetPhysicalDeviceFeatures)next_instance_proc(*instance, "vkGetPhysicalDeviceFeatures");
        next_features2 = (PFN_vkGetPhysicalDeviceFeatures2)next_instance_proc(*instance, "vkGetPhysicalDeviceFeatures2");
    }
    return result;
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
    // The features were reported unsupported, so a request for them here is a caller's own.
    int clear = !log_only(), in_core = 0;
    if (info->pEnabledFeatures) {
        VkPhysicalDeviceFeatures *core = (VkPhysicalDeviceFeatures *)info->pEnabledFeatures;
        in_core = core->robustBufferAccess == VK_TRUE;
        if (clear)
            core->robustBufferAccess = VK_FALSE;
    }
    int in_chain = clear_chain((void *)info->pNext, clear), requested = in_core + in_chain;
    if (clear)
        fprintf(stderr, "VK_LAYER_SPARSEKV_no_robustness: device created without robust buffer access "
                        "(%d requests for it removed)\n", requested);
    else
        fprintf(stderr, "VK_LAYER_SPARSEKV_no_robustness (log only): the device asks for %d "
                        "robustness features (%d in pEnabledFeatures, %d in the pNext chain)\n",
                requested, in_core, in_chain);
    PFN_vkCreateDevice next = (PFN_vkCreateDevice)gipa(VK_NULL_HANDLE, "vkCreateDevice");
    return next(gpu, info, alloc, device);
}

// The layer's own lookups are static functions: an exported symbol's address taken inside the
// library could resolve to the loader's function of the same name, and the chain would call
// itself.
static VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL device_proc(VkDevice device, const char *name) {
    if (!strcmp(name, "vkGetDeviceProcAddr"))
        return (PFN_vkVoidFunction)device_proc;
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
    {"vkGetPhysicalDeviceFeatures", (PFN_vkVoidFunction)features},
    {"vkGetPhysicalDeviceFeatures2", (PFN_vkVoidFunction)features2},
    {"vkGetPhysicalDeviceFeatures2KHR", (PFN_vkVoidFunction)features2_khr},
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
