//! Windows only: WinFsp's DLL lives in WinFsp's own directory, not on the
//! DLL search path, so cairn.exe must delay-load it (and `winfsp_wrs::init`
//! loads it by full path first). Without this the .exe would not start at
//! all on a machine without WinFsp, instead of explaining what to install.
//! This keys on the *target*, so it also works when cross-compiling.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/winfsp/winfsp-x64.def");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "windows" {
        return;
    }
    match env.as_str() {
        "gnu" => gnu_delay_import(),
        // On Windows with MSVC, winfsp_wrs_sys links WinFsp's import library;
        // the linker turns it into a delay import.
        "msvc" => {
            println!("cargo:rustc-link-lib=delayimp");
            println!("cargo:rustc-link-arg=/DELAYLOAD:winfsp-x64.dll");
        }
        other => panic!("unsupported Windows target environment {other:?}"),
    }
}

/// mingw: build a delay-import library from the .def of WinFsp's exports
/// and link it last (GNU ld resolves left to right); `__delayLoadHelper2`
/// comes from libmingwex (Debian's libdelayimp.a is an empty stub), and
/// needs kernel32 after it.
fn gnu_delay_import() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let lib = out.join("libwinfsp-x64-delay.a");
    let dlltool = std::env::var("DLLTOOL").unwrap_or_else(|_| "x86_64-w64-mingw32-dlltool".into());
    let status = std::process::Command::new(&dlltool)
        .args([
            "--input-def",
            "src/winfsp/winfsp-x64.def",
            "--dllname",
            "winfsp-x64.dll",
            "--output-delaylib",
        ])
        .arg(&lib)
        .status()
        .unwrap_or_else(|e| panic!("running {dlltool} (Debian: apt-get install mingw-w64): {e}"));
    assert!(
        status.success(),
        "{dlltool} failed to build the WinFsp delay-import library"
    );
    println!("cargo:rustc-link-arg-bins={}", lib.display());
    // The delay-load helper itself calls kernel32 (LocalAlloc).
    for arg in [lib.display().to_string(), "-lmingwex".into(), "-lkernel32".into()] {
        println!("cargo:rustc-link-arg-bins={arg}");
        println!("cargo:rustc-link-arg-tests={arg}");
    }
}
