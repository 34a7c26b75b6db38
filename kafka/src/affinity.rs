//! Pinning a Kafka thread to its shard's CPU, so a shard's Kafka work stays on the shard's core.

/// Restricts the calling thread to `cpu`.
#[allow(unsafe_code)]
pub(crate) fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("CPU {cpu} is out of range")));
    }
    // SAFETY: `set` is a plain bit set that lives for the whole call; CPU_ZERO/CPU_SET write
    // inside it (cpu < CPU_SETSIZE was checked), and sched_setaffinity(0, …) only reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
