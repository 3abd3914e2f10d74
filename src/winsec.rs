//! Windows: what umask, modes and SO_PEERCRED do for cairn on Unix. The
//! home gets a protected DACL (its owner and SYSTEM only, inherited by
//! everything below), a home another user owns is refused, and the control
//! pipe is created owner-only and checked from both ends: the daemon serves
//! only its own user, and a client talks only to a pipe its own user serves
//! (another user could otherwise create the pipe first and read requests).

use std::ffi::c_void;
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::AsRawHandle;
use std::path::Path;

use windows_sys::Win32::Foundation::{CloseHandle, LocalFree, BOOL, HANDLE, PSID};
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, ConvertStringSecurityDescriptorToSecurityDescriptorW, GetNamedSecurityInfoW,
    SetNamedSecurityInfoW, SDDL_REVISION_1, SE_FILE_OBJECT,
};
use windows_sys::Win32::Security::{
    EqualSid, GetSecurityDescriptorControl, GetSecurityDescriptorDacl, GetTokenInformation, TokenUser, ACL,
    DACL_SECURITY_INFORMATION, OWNER_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR,
    SECURITY_ATTRIBUTES, SE_DACL_PROTECTED, TOKEN_QUERY, TOKEN_USER,
};
use windows_sys::Win32::System::Pipes::{GetNamedPipeClientProcessId, GetNamedPipeServerProcessId};
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, OpenProcess, OpenProcessToken, PROCESS_QUERY_LIMITED_INFORMATION,
};

fn wide(s: &std::ffi::OsStr) -> Vec<u16> {
    s.encode_wide().chain(Some(0)).collect()
}

fn check(ok: BOOL) -> io::Result<()> {
    if ok == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Memory Windows allocated for us with LocalAlloc.
struct Local(*mut c_void);

impl Drop for Local {
    fn drop(&mut self) {
        // SAFETY: the pointer came from an API that says to LocalFree it.
        unsafe { LocalFree(self.0 as _) };
    }
}

/// The user a process runs as: its token's user SID, copied out.
fn process_user(process: HANDLE) -> io::Result<Vec<u8>> {
    let mut token: HANDLE = 0;
    // SAFETY: a query-only token handle of a process handle we hold.
    check(unsafe { OpenProcessToken(process, TOKEN_QUERY, &mut token) })?;
    // u64s: aligned for the TOKEN_USER it receives.
    let mut buf = vec![0u64; 64];
    let mut len = 0u32;
    // SAFETY: buf is writable for its length in bytes; the token handle is ours.
    let ok = unsafe { GetTokenInformation(token, TokenUser, buf.as_mut_ptr().cast(), 512, &mut len) };
    // SAFETY: closing the token handle opened above.
    unsafe { CloseHandle(token) };
    check(ok)?;
    // SAFETY: GetTokenInformation filled a TOKEN_USER at the start of buf.
    let sid = unsafe { (*(buf.as_ptr() as *const TOKEN_USER)).User.Sid };
    sid_bytes(sid)
}

/// A SID's bytes (copied, so the memory it lives in may go).
fn sid_bytes(sid: PSID) -> io::Result<Vec<u8>> {
    if sid.is_null() {
        return Err(io::Error::other("no owner SID"));
    }
    // SAFETY: a valid SID: revision, sub-authority count at byte 1, then
    // 6 bytes of authority and 4 per sub-authority.
    unsafe {
        let count = *(sid as *const u8).add(1) as usize;
        Ok(std::slice::from_raw_parts(sid as *const u8, 8 + 4 * count).to_vec())
    }
}

fn same_sid(a: &[u8], b: &[u8]) -> bool {
    // SAFETY: both hold whole SIDs (sid_bytes).
    unsafe { EqualSid(a.as_ptr() as PSID, b.as_ptr() as PSID) != 0 }
}

fn current_user() -> io::Result<Vec<u8>> {
    // SAFETY: the pseudo-handle of this process needs no closing.
    process_user(unsafe { GetCurrentProcess() })
}

fn sid_string(sid: &[u8]) -> io::Result<String> {
    let mut out: *mut u16 = std::ptr::null_mut();
    // SAFETY: a whole SID in; a LocalAlloc'ed string out.
    check(unsafe { ConvertSidToStringSidW(sid.as_ptr() as PSID, &mut out) })?;
    let _free = Local(out.cast());
    // SAFETY: a NUL-terminated string from ConvertSidToStringSidW.
    let len = (0..).take_while(|&i| unsafe { *out.add(i) } != 0).count();
    // SAFETY: len u16s were just read.
    Ok(String::from_utf16_lossy(unsafe {
        std::slice::from_raw_parts(out, len)
    }))
}

/// A security descriptor (self-relative, LocalAlloc'ed) that lets only the
/// current user and SYSTEM in, inherited by files and folders below.
fn owner_only_descriptor() -> io::Result<Local> {
    let sddl = format!("D:P(A;OICI;FA;;;{})(A;OICI;FA;;;SY)", sid_string(&current_user()?)?);
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: a NUL-terminated SDDL string in; a LocalAlloc'ed descriptor out.
    check(unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            wide(sddl.as_ref()).as_ptr(),
            SDDL_REVISION_1,
            &mut sd,
            std::ptr::null_mut(),
        )
    })?;
    Ok(Local(sd))
}

/// What the home's own security says: its owner, unless that is the
/// current user, and whether its DACL is protected (inherits nothing).
pub struct HomeSecurity {
    pub foreign_owner: Option<String>,
    pub protected: bool,
}

pub fn home_security(path: &Path) -> io::Result<HomeSecurity> {
    let mut owner: PSID = std::ptr::null_mut();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: a NUL-terminated path; the descriptor out is LocalFree'd.
    let err = unsafe {
        GetNamedSecurityInfoW(
            wide(path.as_os_str()).as_ptr(),
            SE_FILE_OBJECT,
            OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
            &mut owner,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err as i32));
    }
    let _free = Local(sd);
    let (mut control, mut revision) = (0u16, 0u32);
    // SAFETY: the descriptor returned above.
    check(unsafe { GetSecurityDescriptorControl(sd, &mut control, &mut revision) })?;
    let owner = sid_bytes(owner)?;
    Ok(HomeSecurity {
        foreign_owner: (!same_sid(&owner, &current_user()?)).then(|| sid_string(&owner).unwrap_or_default()),
        protected: control & SE_DACL_PROTECTED != 0,
    })
}

/// Gives `dir` (and, by inheritance, everything in it) the owner-only DACL,
/// replacing whatever it inherited from its parent.
pub fn make_owner_only(dir: &Path) -> io::Result<()> {
    let sd = owner_only_descriptor()?;
    let (mut present, mut defaulted) = (0, 0);
    let mut dacl: *mut ACL = std::ptr::null_mut();
    // SAFETY: a descriptor made above; the DACL pointer points into it.
    check(unsafe { GetSecurityDescriptorDacl(sd.0, &mut present, &mut dacl, &mut defaulted) })?;
    // SAFETY: a NUL-terminated path and a DACL that outlives the call.
    let err = unsafe {
        SetNamedSecurityInfoW(
            wide(dir.as_os_str()).as_ptr(),
            SE_FILE_OBJECT,
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            dacl,
            std::ptr::null(),
        )
    };
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err as i32));
    }
    Ok(())
}

/// Security attributes for the control pipe: its owner and SYSTEM only. The
/// descriptor must live while the attributes are used.
pub struct PipeSecurity {
    sd: Local,
    attributes: SECURITY_ATTRIBUTES,
}

// SAFETY: the descriptor is memory this value alone owns (LocalAlloc'ed,
// freed on drop), tied to no thread.
unsafe impl Send for PipeSecurity {}

impl PipeSecurity {
    pub fn new() -> io::Result<Box<PipeSecurity>> {
        let sd = owner_only_descriptor()?;
        let mut s = Box::new(PipeSecurity {
            attributes: SECURITY_ATTRIBUTES {
                nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
                lpSecurityDescriptor: std::ptr::null_mut(),
                bInheritHandle: 0,
            },
            sd,
        });
        s.attributes.lpSecurityDescriptor = s.sd.0;
        Ok(s)
    }

    /// For `CreateNamedPipe`; valid while `self` lives.
    pub fn attributes(&mut self) -> *mut c_void {
        std::ptr::addr_of_mut!(self.attributes).cast()
    }
}

/// Whether the process at the other end of a pipe runs as the current
/// user: `server` asks of the pipe's server (a client's check), otherwise
/// of its client (the daemon's).
pub fn peer_is_me(pipe: &impl AsRawHandle, server: bool) -> io::Result<bool> {
    let handle = pipe.as_raw_handle() as HANDLE;
    let mut pid = 0u32;
    // SAFETY: a pipe handle we hold; pid is written.
    check(unsafe {
        if server {
            GetNamedPipeServerProcessId(handle, &mut pid)
        } else {
            GetNamedPipeClientProcessId(handle, &mut pid)
        }
    })?;
    // SAFETY: a query-only handle, closed below.
    let process = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if process == 0 {
        return Err(io::Error::last_os_error());
    }
    let user = process_user(process);
    // SAFETY: the handle opened above.
    unsafe { CloseHandle(process) };
    Ok(same_sid(&user?, &current_user()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn under_wine() -> bool {
        use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleA, GetProcAddress};
        // SAFETY: ntdll is always loaded; a NUL-terminated name is looked up.
        unsafe {
            let ntdll = GetModuleHandleA(c"ntdll.dll".as_ptr().cast());
            ntdll != 0 && GetProcAddress(ntdll, c"wine_get_version".as_ptr().cast()).is_some()
        }
    }

    #[test]
    fn a_new_home_is_owner_only_and_a_pipe_sees_its_own_user_at_both_ends() {
        let parent = tempfile::tempdir().unwrap();
        let home = parent.path().join("home");
        crate::home::secure(&home, true).unwrap();
        let security = home_security(&home).unwrap();
        assert!(security.foreign_owner.is_none());
        // Wine accepts a DACL but does not keep it on a Unix file system.
        assert!(
            security.protected || under_wine(),
            "the home's DACL inherits from its parent"
        );
        // A second look changes nothing and is accepted.
        crate::home::secure(&home, false).unwrap();

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            use tokio::net::windows::named_pipe::ServerOptions;
            let name = format!(r"\\.\pipe\cairn-test-{}", std::process::id());
            let mut security = PipeSecurity::new().unwrap();
            // SAFETY: `security` outlives the call.
            let server = unsafe {
                ServerOptions::new()
                    .first_pipe_instance(true)
                    .create_with_security_attributes_raw(&name, security.attributes())
            }
            .unwrap();
            // A second first instance of the name is refused (Windows does;
            // Wine does not).
            assert!(ServerOptions::new().first_pipe_instance(true).create(&name).is_err() || under_wine());
            let client = std::fs::OpenOptions::new().read(true).write(true).open(&name).unwrap();
            server.connect().await.unwrap();
            assert!(peer_is_me(&client, true).unwrap(), "the client sees its own user serve");
            assert!(
                peer_is_me(&server, false).unwrap(),
                "the server sees its own user connect"
            );
        });
    }
}
