//! The few kernel calls aya 0.14 does not wrap: mounting bpffs, reopening a pinned link
//! and swapping its program (BPF_OBJ_GET + BPF_LINK_UPDATE), and reading the network
//! namespace cookie.
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use tracing::info;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const SO_NETNS_COOKIE: libc::c_int = 71;
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure `dir` lies on a bpffs; mounts one at /sys/fs/bpf when it is missing there.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let parent = dir.parent().unwrap_or(dir);
    if is_bpffs(parent)? {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return Err(io::Error::other(format!(
            "{} is not on a bpffs",
            parent.display()
        )));
    }
    fs::create_dir_all(root)?;
    if !is_bpffs(root)? {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(io::Error::from)?;
        info!(path = "/sys/fs/bpf", "mounted bpffs");
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    match nix::sys::statfs::statfs(path) {
        Ok(st) => Ok(st.filesystem_type().0 == BPF_FS_MAGIC),
        Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Creates a root-only directory (pinned maps are the node's routing table).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zeroed bpf_attr of 128 bytes, larger than any command here needs.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned object (BPF_OBJ_GET).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Swaps the program behind a pinned link (BPF_LINK_UPDATE): the hook is never empty.
pub fn link_update(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let link = obj_get(pin)?;
    let mut attr = [0u64; 16];
    // struct { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
    attr[0] = (link.as_raw_fd() as u32 as u64) | ((prog.as_raw_fd() as u32 as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

/// The cookie of this process's network namespace (the node's).
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket/getsockopt/close with valid pointers.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(s);
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        );
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Result of a batch call: how many elements the kernel processed, and the error that
/// stopped it at the next one (if any).
pub struct BatchResult {
    pub done: usize,
    pub error: Option<io::Error>,
}

fn batch(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> BatchResult {
    let mut attr = [0u64; 16];
    // union bpf_attr.batch: in_batch, out_batch, keys, values, count|map_fd, elem_flags, flags
    attr[2] = keys as u64;
    attr[3] = values as u64;
    attr[4] = (count as u32 as u64) | ((fd.as_raw_fd() as u32 as u64) << 32);
    let r = bpf(cmd, &mut attr);
    let done = (attr[4] & 0xffff_ffff) as usize;
    match r {
        Ok(_) => BatchResult {
            done: count,
            error: None,
        },
        Err(e) => BatchResult {
            done: done.min(count),
            error: Some(e),
        },
    }
}

/// BPF_MAP_UPDATE_BATCH: one system call for many writes (`keys.len() == values.len()`).
pub fn update_batch<K: Copy, V: Copy>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> BatchResult {
    assert_eq!(keys.len(), values.len(), "keys and values pair up");
    batch(
        BPF_MAP_UPDATE_BATCH,
        fd,
        keys.as_ptr().cast(),
        values.as_ptr().cast(),
        keys.len(),
    )
}

/// BPF_MAP_DELETE_BATCH.
pub fn delete_batch<K: Copy>(fd: BorrowedFd<'_>, keys: &[K]) -> BatchResult {
    batch(
        BPF_MAP_DELETE_BATCH,
        fd,
        keys.as_ptr().cast(),
        std::ptr::null(),
        keys.len(),
    )
}
