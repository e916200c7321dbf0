//! Modules: upload checks, componentization of core modules, and the cache of pre-linked modules
//! by content hash.
//!
//! Users upload either a wasm component or a core module built for `wasm32-unknown-unknown` with
//! the guest SDK (wit-bindgen embeds the component type in a custom section); a core module is
//! turned into a component here, once. A module's id is the SHA-256 of the bytes as uploaded.
//! Compiled code lives only in this process's memory and is never shipped to other nodes.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::compile::{CodeSettings, Compiler};
use super::host_fns::{JobState, JobWorldPre};
use crate::error::{ErrorCode, RemoteError, Result, error};
use crate::storage::ModuleId;

/// A module ready to instantiate.
pub struct LoadedModule {
    /// SHA-256 of the uploaded bytes.
    pub id: ModuleId,
    pub(crate) pre: JobWorldPre<JobState>,
}

/// `sha256:` + hex, the id as users see it.
pub fn module_id_text(id: &ModuleId) -> String {
    format!("sha256:{}", hex::encode(id))
}

/// Parses `sha256:HEX` into an id, or `None` if `text` is not of that form (it is then a name).
pub fn parse_module_id(text: &str) -> Option<ModuleId> {
    let hex_digits = text.strip_prefix("sha256:")?;
    hex::decode(hex_digits).ok()?.try_into().ok()
}

/// Compiled modules by id, least recently used dropped first; optionally also on disk, so a
/// restarted node does not compile them again.
pub(crate) struct Modules {
    engine: Engine,
    linker: Linker<JobState>,
    cache: Mutex<LruCache<ModuleId, Arc<LoadedModule>>>,
    code_dir: Option<PathBuf>,
    /// Compiles in a child process when set; in this process otherwise.
    compiler: Option<(Compiler, CodeSettings)>,
}

impl Modules {
    pub(crate) fn new(engine: Engine, linker: Linker<JobState>, capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity.max(1)).expect("at least 1");
        Modules { engine, linker, cache: Mutex::new(LruCache::new(capacity)), code_dir: None, compiler: None }
    }

    /// Compiles in child processes from now on ([`super::compile`]).
    pub(crate) fn set_compiler(&mut self, compiler: Compiler, settings: CodeSettings) {
        self.compiler = Some((compiler, settings));
    }

    /// Keeps compiled code in `dir` (`<module id>.cwasm`) as well as in memory.
    pub(crate) fn set_code_dir(&mut self, dir: PathBuf) {
        self.code_dir = Some(dir);
    }

    /// Where module `id`'s compiled code is kept, if it is kept on disk.
    fn code_path(&self, id: &ModuleId) -> Option<PathBuf> {
        self.code_dir.as_ref().map(|dir| dir.join(format!("{}.cwasm", hex::encode(id))))
    }

    /// The component for `wasm`: from the code directory when a usable compiled copy is there,
    /// else compiled (and then written there).
    fn component(&self, id: &ModuleId, wasm: &[u8]) -> Result<Component> {
        let path = self.code_path(id);
        if let Some(path) = path.as_ref().filter(|p| p.exists()) {
            // Safety: the file is compiled code this node wrote into its own data directory (the same
            // trust as the data itself); wasmtime checks that it matches this engine and version and
            // refuses it otherwise, in which case the module is compiled again below.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "compiled code unusable; recompiling"),
            }
        }
        let component_bytes = to_component(wasm)?;
        check_core_instances(&component_bytes)?;
        let Some((compiler, settings)) = &self.compiler else {
            let component = Component::new(&self.engine, &component_bytes)
                .map_err(|e| invalid(format!("the component does not compile: {e:#}")))?;
            if let Some(path) = path
                && let Err(e) = component.serialize().map_err(std::io::Error::other).and_then(|c| write_code(&c, &path))
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep compiled code on disk");
            }
            return Ok(component);
        };
        let started = std::time::Instant::now();
        let code = compiler.compile(&component_bytes, *settings)?;
        // Safety: the code was compiled just now by this node's own binary (the same trust as the
        // code directory); wasmtime checks that it fits this engine.
        let component = unsafe { Component::deserialize(&self.engine, &code) }.map_err(|e| {
            error(ErrorCode::Internal, format!("the compiler's code does not load in this engine: {e:#}"))
        })?;
        tracing::debug!(bytes = wasm.len(), ms = started.elapsed().as_millis() as u64, "module compiled");
        if let Some(path) = path
            && let Err(e) = write_code(&code, &path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep compiled code on disk");
        }
        Ok(component)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LruCache<ModuleId, Arc<LoadedModule>>> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The compiled module with this id, if it is in the cache.
    pub(crate) fn cached(&self, id: &ModuleId) -> Option<Arc<LoadedModule>> {
        self.cache().get(id).cloned()
    }

    /// Drops module `id`'s compiled code, from memory and from the code directory. A job that
    /// runs it keeps its instance (and the code under it) until it ends.
    pub(crate) fn forget(&self, id: &ModuleId) {
        self.cache().pop(id);
        if let Some(path) = self.code_path(id) {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(id = %module_id_text(id), "deleted the compiled code of a module no name points to")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot delete compiled code"),
            }
        }
    }

    /// Compiles and links `wasm` (slow: call off the async executor), caching the result.
    pub(crate) fn compile(&self, wasm: &[u8]) -> Result<Arc<LoadedModule>> {
        let id: ModuleId = Sha256::digest(wasm).into();
        if let Some(module) = self.cached(&id) {
            return Ok(module);
        }
        let component = self.component(&id, wasm)?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|e| {
            invalid(format!(
                "the module needs imports Grex does not provide ({e:#}); a job may import only the grex:job world \
                 (build it for wasm32-unknown-unknown with grex-sdk, not for a WASI target)"
            ))
        })?;
        let pre = JobWorldPre::new(instance_pre)
            .map_err(|e| invalid(format!("the module does not export `run` of the grex:job world: {e:#}")))?;
        let module = Arc::new(LoadedModule { id, pre });
        self.cache().put(id, module.clone());
        Ok(module)
    }
}

/// Writes compiled code next to its final name and renames it, so a crash never leaves a torn file.
fn write_code(code: &[u8], path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension("cwasm.tmp");
    std::fs::write(&tmp, code)?;
    std::fs::rename(&tmp, path)
}

fn invalid(message: String) -> RemoteError {
    error(ErrorCode::ModuleInvalid, message)
}

/// The uploaded bytes as a component: components pass through, core modules are componentized.
/// Refuses a component with more core instances than the instance pool gives a job (a Rust or
/// JavaScript job has one or two, a Python job about 40), before it is compiled: counted over
/// the component and the components nested in it.
fn check_core_instances(component: &[u8]) -> Result<()> {
    let mut count = 0u32;
    for payload in wasmparser::Parser::new(0).parse_all(component) {
        // Only instantiations make instances; a bag of exports named as an instance does not.
        if let Ok(wasmparser::Payload::InstanceSection(section)) = payload {
            let made = section.into_iter().filter(|i| matches!(i, Ok(wasmparser::Instance::Instantiate { .. })));
            count = count.saturating_add(made.count() as u32);
        }
    }
    let max = super::engine::CORE_INSTANCES_PER_JOB;
    if count > max {
        return Err(error(
            ErrorCode::ModuleTooComplex,
            format!("the component creates {count} core instances; a job may have at most {max} (link fewer modules)"),
        ));
    }
    Ok(())
}

fn to_component(wasm: &[u8]) -> Result<Vec<u8>> {
    if wasmparser::Parser::is_component(wasm) {
        return Ok(wasm.to_vec());
    }
    if !wasmparser::Parser::is_core_wasm(wasm) {
        let head: Vec<String> = wasm.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(invalid(format!(
            "not a wasm module (it starts with {}; wasm starts with 00 61 73 6d); upload the .wasm file cargo built",
            head.join(" ")
        )));
    }
    // wit-component assumes a well-formed module (a truncated one can make it panic): validate
    // first, and treat a panic that still gets through as an invalid module too.
    wasmparser::Validator::new().validate_all(wasm).map_err(|e| {
        invalid(format!("the core module is not valid wasm ({e}); upload the whole .wasm file cargo built"))
    })?;
    let encode = || wit_component::ComponentEncoder::default().validate(true).module(wasm)?.encode();
    match std::panic::catch_unwind(encode) {
        Ok(Ok(component)) => Ok(component),
        Ok(Err(e)) => Err(invalid(format!(
            "the core module cannot be made into a grex:job component ({e:#}); build it with grex-sdk and its job! macro"
        ))),
        Err(_) => Err(invalid(
            "the core module's component type cannot be read; build it with grex-sdk and its job! macro".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_ids_round_trip_through_their_text_form() {
        let id = [0xab; 32];
        assert_eq!(parse_module_id(&module_id_text(&id)), Some(id));
        assert_eq!(parse_module_id("counter"), None);
        assert_eq!(parse_module_id("sha256:abcd"), None);
    }

    /// A component of an empty core module instantiated `n` times, and an instance made of no
    /// exports, which is not counted (n < 127).
    fn component_of_instances(n: u8) -> Vec<u8> {
        let mut bytes = vec![0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
        bytes.extend([0x01, 8, 0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]);
        let mut section = vec![n + 1];
        for _ in 0..n {
            section.extend([0x00, 0x00, 0x00]); // instantiate module 0 with no arguments
        }
        section.extend([0x01, 0x00]); // an instance of no exports
        bytes.push(0x02);
        let len = section.len();
        bytes.extend([(len as u8 & 0x7f) | 0x80, (len >> 7) as u8]);
        bytes.extend(section);
        bytes
    }

    #[test]
    fn a_component_with_more_core_instances_than_a_job_may_have_is_refused_by_name() {
        let max = crate::wasm::engine::CORE_INSTANCES_PER_JOB as u8;
        check_core_instances(&component_of_instances(max)).expect("at the limit");
        let err = check_core_instances(&component_of_instances(max + 1)).unwrap_err();
        assert_eq!(err.code, ErrorCode::ModuleTooComplex);
        assert!(err.message.contains(&format!("{} core instances", max + 1)), "{}", err.message);
    }

    #[test]
    fn bytes_that_are_not_wasm_are_refused_with_advice() {
        let err = to_component(b"#!/bin/sh\necho hi").unwrap_err();
        assert_eq!(err.code, ErrorCode::ModuleInvalid);
        assert!(err.message.contains("not a wasm module"), "{}", err.message);
    }
}
