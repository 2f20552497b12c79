//! A wgpu device on Vulkan without the driver's robust buffer access (feature `vulkan`).
//!
//! wgpu-hal turns on `robustBufferAccess`, and `robustBufferAccess2` where the driver has
//! VK_EXT_robustness2, on every device that supports them, and CubeCL's own Vulkan device
//! request enables every supported core feature, so the driver bounds-checks every buffer
//! access of every kernel. CubeCL checks bounds inside the kernels it launches checked, and
//! this crate launches its kernels unchecked only after the host has validated every bound, so
//! the driver's checks are pure cost here (docs/PERF-NOTES.md measures how much).
//!
//! [`vulkan_device_without_robustness`] builds the same device CubeCL would (its public
//! Vulkan device request, with its feature set and cooperative matrices), through a Vulkan
//! entry point whose feature queries report the two robustness features as unsupported:
//! wgpu-hal and CubeCL both look their functions up through it (the instance's own table and
//! the extension loaders alike), so neither enables them.

use std::ffi::{CStr, c_char};
use std::sync::OnceLock;

use ash::vk;
use cubecl::wgpu::{RuntimeOptions, WgpuDevice, WgpuSetup, init_device};
use wgpu::hal;

use crate::error::{KernelError, Result};

/// The system's Vulkan loader, kept loaded for the life of the process.
static LOADER: OnceLock<ash::Entry> = OnceLock::new();
/// The driver's feature queries, called by the wrappers below.
static DRIVER_FEATURES: OnceLock<vk::PFN_vkGetPhysicalDeviceFeatures> = OnceLock::new();
static DRIVER_FEATURES2: OnceLock<vk::PFN_vkGetPhysicalDeviceFeatures2> = OnceLock::new();
/// The one device of the process.
static DEVICE: OnceLock<std::result::Result<WgpuDevice, String>> = OnceLock::new();

/// `vkGetInstanceProcAddr` answering the feature queries with the wrappers below and
/// everything else as the loader does.
unsafe extern "system" fn instance_proc(
    instance: vk::Instance,
    name: *const c_char,
) -> vk::PFN_vkVoidFunction {
    // SAFETY: Vulkan passes a NUL-terminated name.
    let wanted = unsafe { CStr::from_ptr(name) }.to_bytes();
    // SAFETY: each wrapper is cast to the generic function type the lookup returns; callers
    // cast it back to its own signature by the name they asked for.
    unsafe {
        match wanted {
            b"vkGetPhysicalDeviceFeatures" => Some(std::mem::transmute::<
                unsafe extern "system" fn(vk::PhysicalDevice, *mut vk::PhysicalDeviceFeatures),
                unsafe extern "system" fn(),
            >(features)),
            b"vkGetPhysicalDeviceFeatures2" | b"vkGetPhysicalDeviceFeatures2KHR" => {
                Some(std::mem::transmute::<
                    unsafe extern "system" fn(
                        vk::PhysicalDevice,
                        *mut vk::PhysicalDeviceFeatures2<'_>,
                    ),
                    unsafe extern "system" fn(),
                >(features2))
            }
            _ => match LOADER.get() {
                Some(loader) => (loader.static_fn().get_instance_proc_addr)(instance, name),
                None => None,
            },
        }
    }
}

/// `vkGetPhysicalDeviceFeatures` with `robustBufferAccess` reported unsupported.
unsafe extern "system" fn features(gpu: vk::PhysicalDevice, out: *mut vk::PhysicalDeviceFeatures) {
    if let Some(driver) = DRIVER_FEATURES.get() {
        // SAFETY: the caller's arguments, passed on; `out` is valid after the call.
        unsafe {
            driver(gpu, out);
            (*out).robust_buffer_access = vk::FALSE;
        }
    }
}

/// `vkGetPhysicalDeviceFeatures2` with `robustBufferAccess` and `robustBufferAccess2`
/// reported unsupported, wherever they sit in the caller's chain.
unsafe extern "system" fn features2(
    gpu: vk::PhysicalDevice,
    out: *mut vk::PhysicalDeviceFeatures2<'_>,
) {
    let Some(driver) = DRIVER_FEATURES2.get() else {
        return;
    };
    // SAFETY: the caller's arguments, passed on; the chain is the caller's, of structures
    // whose type its `s_type` names.
    unsafe {
        driver(gpu, out);
        let mut next = out.cast::<vk::BaseOutStructure<'_>>();
        while !next.is_null() {
            match (*next).s_type {
                vk::StructureType::PHYSICAL_DEVICE_FEATURES_2 => {
                    let f = next.cast::<vk::PhysicalDeviceFeatures2<'_>>();
                    (*f).features.robust_buffer_access = vk::FALSE;
                }
                vk::StructureType::PHYSICAL_DEVICE_ROBUSTNESS_2_FEATURES_EXT => {
                    let f = next.cast::<vk::PhysicalDeviceRobustness2FeaturesEXT<'_>>();
                    (*f).robust_buffer_access2 = vk::FALSE;
                }
                _ => {}
            }
            next = (*next).p_next;
        }
    }
}

/// The process's wgpu device on the first Vulkan adapter (discrete GPUs first), made as CubeCL
/// makes its own but without the driver's robust buffer access (module docs). Later calls
/// return the same device. Kernels compile to SPIR-V on it as on CubeCL's default device with
/// the `vulkan` feature.
///
/// # Errors
/// [`KernelError::Runtime`] when no Vulkan loader, instance or adapter can be had, or the
/// adapter lacks what CubeCL's SPIR-V path needs.
pub fn vulkan_device_without_robustness() -> Result<WgpuDevice> {
    DEVICE
        .get_or_init(create)
        .clone()
        .map_err(KernelError::Runtime)
}

fn create() -> std::result::Result<WgpuDevice, String> {
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("Vulkan {what}: {e}");
    // SAFETY: loading the system's Vulkan loader, as wgpu-hal does.
    let loader = unsafe { ash::Entry::load() }.map_err(|e| failed("loader", &e))?;
    let loader = LOADER.get_or_init(|| loader);
    // SAFETY: `instance_proc` has the loader's signature and forwards to it (kept loaded).
    let entry = unsafe {
        ash::Entry::from_static_fn(ash::StaticFn {
            get_instance_proc_addr: instance_proc,
        })
    };
    // SAFETY: a query of the loader.
    let version = unsafe { entry.try_enumerate_instance_version() }
        .map_err(|e| failed("instance version", &e))?
        .unwrap_or(vk::API_VERSION_1_0);
    let flags = wgpu::InstanceFlags::empty();
    let extensions = hal::vulkan::Instance::desired_extensions(&entry, version, flags)
        .map_err(|e| failed("instance extensions", &e))?;
    let names: Vec<_> = extensions.iter().map(|e| e.as_ptr()).collect();
    let app = vk::ApplicationInfo::default()
        .application_name(c"sparsekv")
        .api_version(version);
    let info = vk::InstanceCreateInfo::default()
        .application_info(&app)
        .enabled_extension_names(&names);
    // SAFETY: a valid create info whose extensions the loader reported.
    let instance =
        unsafe { entry.create_instance(&info, None) }.map_err(|e| failed("instance", &e))?;
    let lookup = |name: &CStr| {
        // SAFETY: the loader's own lookup, for the instance it created.
        unsafe { (loader.static_fn().get_instance_proc_addr)(instance.handle(), name.as_ptr()) }
    };
    // SAFETY: the loader's functions under those names have these signatures.
    unsafe {
        if let Some(f) = lookup(c"vkGetPhysicalDeviceFeatures") {
            let _ = DRIVER_FEATURES.set(std::mem::transmute::<
                unsafe extern "system" fn(),
                vk::PFN_vkGetPhysicalDeviceFeatures,
            >(f));
        }
        // Vulkan 1.0 drivers have the query only as the extension's.
        let features2 = lookup(c"vkGetPhysicalDeviceFeatures2")
            .or_else(|| lookup(c"vkGetPhysicalDeviceFeatures2KHR"));
        if let Some(f) = features2 {
            let _ = DRIVER_FEATURES2.set(std::mem::transmute::<
                unsafe extern "system" fn(),
                vk::PFN_vkGetPhysicalDeviceFeatures2,
            >(f));
        }
    }
    // SAFETY: the instance was created from `entry` with `version`, `extensions` (wgpu-hal's
    // desired ones) and `flags`; wgpu-hal takes ownership of it (no drop callback).
    let hal_instance = unsafe {
        hal::vulkan::Instance::from_raw(
            entry,
            instance,
            version,
            0,
            None,
            extensions,
            flags,
            Default::default(),
            false,
            None,
        )
    }
    .map_err(|e| failed("instance", &e))?;
    // SAFETY: a hal instance of the Vulkan backend, handed over whole.
    let instance = unsafe { wgpu::Instance::from_hal::<hal::api::Vulkan>(hal_instance) };
    let mut adapters =
        cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
    adapters.sort_by_key(|a| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        _ => 3,
    });
    let adapter = adapters
        .into_iter()
        .next()
        .ok_or_else(|| "no Vulkan adapter".to_string())?;
    let (device, queue) =
        cubecl::future::block_on(cubecl::wgpu::vulkan::request_vulkan_device(&adapter))
            .ok_or_else(|| {
                format!(
                    "the Vulkan adapter {} lacks features CubeCL's SPIR-V path needs",
                    adapter.get_info().name
                )
            })?;
    let setup = WgpuSetup {
        instance,
        adapter,
        device,
        queue,
        backend: wgpu::Backend::Vulkan,
    };
    Ok(init_device(setup, RuntimeOptions::default()))
}
