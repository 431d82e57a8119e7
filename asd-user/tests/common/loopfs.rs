//! A user's home on another file system (issue 8): a loop image formatted as ext4, btrfs or xfs,
//! mounted inside a test's mount namespace only, with the home directory on it bind-mounted over
//! `/home/<user>` there. A helper started in that namespace sees it as the user's home; the host's
//! `/home/<user>` is never touched.

use super::{have, Ns};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The home file systems of the distributions asd meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HomeFs {
    /// Debian, Ubuntu, most others.
    Ext4,
    /// Fedora, openSUSE: the home is a btrfs subvolume, so its mountinfo root is the subvolume's
    /// path and `st_dev` inside it is the subvolume's, not the mount's.
    BtrfsSubvolume,
    /// RHEL and its rebuilds.
    Xfs,
}

impl HomeFs {
    pub const ALL: [HomeFs; 3] = [HomeFs::Ext4, HomeFs::BtrfsSubvolume, HomeFs::Xfs];

    pub fn name(self) -> &'static str {
        match self {
            HomeFs::Ext4 => "ext4",
            HomeFs::BtrfsSubvolume => "btrfs-subvolume",
            HomeFs::Xfs => "xfs",
        }
    }

    fn mkfs(self) -> &'static str {
        match self {
            HomeFs::Ext4 => "mkfs.ext4",
            HomeFs::BtrfsSubvolume => "mkfs.btrfs",
            HomeFs::Xfs => "mkfs.xfs",
        }
    }

    /// What `stat -f -c %T` calls this file system (GNU stat names ext4 by its magic number,
    /// which ext2, ext3 and ext4 share).
    pub fn statfs_name(self) -> &'static str {
        match self {
            HomeFs::Ext4 => "ext2/ext3",
            HomeFs::BtrfsSubvolume => "btrfs",
            HomeFs::Xfs => "xfs",
        }
    }

    /// Fails, saying where the tool comes from, when this machine cannot make the file system:
    /// a matrix that quietly skipped btrfs or xfs would pass them off as tested.
    pub fn require_tools(self) {
        let mut tools = vec![self.mkfs(), "losetup"];
        if self == HomeFs::BtrfsSubvolume {
            tools.push("btrfs");
        }
        for tool in tools {
            assert!(
                have(tool),
                "{tool} is missing: tests/run.sh installs btrfs-progs and xfsprogs (and e2fsprogs); \
                 run it, or `apt-get install btrfs-progs xfsprogs e2fsprogs`"
            );
        }
    }
}

/// A home on a loop-mounted image inside one test namespace.
pub struct LoopHome {
    pub fs: HomeFs,
    /// The image file (on the host's disk, in the namespace's scratch dir).
    pub image: PathBuf,
    /// Where the image is mounted inside the namespace.
    pub mnt: PathBuf,
    /// The home directory on the image (for btrfs, the subvolume).
    pub source: PathBuf,
    /// The user's passwd home, covered by a bind of `source` inside the namespace.
    pub home: PathBuf,
}

/// xfs refuses images under 300 MB; a sparse 512 MiB costs only what is written.
const IMAGE_SIZE: &str = "512M";

impl LoopHome {
    /// Makes an image of `fs` in `ns.root`, mounts it inside `ns` only, makes a home directory on
    /// it owned by `user` with `mode` (the mode of the user's real home, which a distribution's
    /// useradd gave it) and binds it over `/home/<user>` inside `ns`.
    pub fn mount(ns: &Ns, fs: HomeFs, user: &str, mode: u32) -> LoopHome {
        fs.require_tools();
        let image = ns.root.join(format!("{}.img", fs.name()));
        let mnt = ns.root.join(format!("{}-mnt", fs.name()));
        let source = mnt.join("home");
        let home = PathBuf::from(format!("/home/{user}"));
        let make_home = match fs {
            HomeFs::BtrfsSubvolume => format!("btrfs -q subvolume create '{}'", source.display()),
            HomeFs::Ext4 | HomeFs::Xfs => format!("mkdir '{}'", source.display()),
        };
        // `mount -o loop` sets up the loop device with autoclear: it is detached when the file
        // system is unmounted, here or by the namespace going away after a failed test.
        ns.sh_ok(&format!(
            "set -e; truncate -s {IMAGE_SIZE} '{img}'; {mkfs} -q '{img}' >/dev/null; \
             mkdir -p '{mnt}'; mount -o loop '{img}' '{mnt}'; {make_home}; \
             chown {user}: '{src}'; chmod {mode:04o} '{src}'; mount --bind '{src}' '{home}'",
            img = image.display(),
            mkfs = fs.mkfs(),
            mnt = mnt.display(),
            src = source.display(),
            home = home.display(),
        ));
        let lh = LoopHome {
            fs,
            image,
            mnt,
            source,
            home,
        };
        let seen = ns.statfs_type(&lh.home);
        assert_eq!(
            seen,
            fs.statfs_name(),
            "{} is not on {}",
            lh.home.display(),
            fs.name()
        );
        if fs == HomeFs::BtrfsSubvolume {
            // The layout this case is about: the home's mount shows the subvolume, not the
            // file system's top.
            let root = lh.home_mounts(ns).first().map(|m| m.0.clone());
            assert_eq!(
                root.as_deref(),
                Some("/home"),
                "the home's mountinfo root is not the subvolume's path"
            );
        }
        lh
    }

    /// Mounts at or beneath the home inside `ns`, as (mountinfo root, mount point).
    pub fn home_mounts(&self, ns: &Ns) -> Vec<(String, String)> {
        let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", ns.pid))
            .expect("the namespace's mountinfo");
        let home = self.home.to_string_lossy().into_owned();
        let below = format!("{home}/");
        info.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let root = f.nth(3)?.replace("\\040", " ");
                let point = f.next()?.replace("\\040", " ");
                (point == home || point.starts_with(&below)).then_some((root, point))
            })
            .collect()
    }

    /// Loop devices backed by the image, as `losetup -j` lists them.
    pub fn loop_devices(&self) -> Vec<String> {
        let out = std::process::Command::new("losetup")
            .arg("-j")
            .arg(&self.image)
            .output()
            .expect("losetup");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Takes the home bind and the image's mount down inside `ns` (each fails while anything is
    /// still mounted beneath it), then waits for the loop device to be detached (autoclear runs
    /// when the last reference to the file system goes).
    pub fn unmount(&self, ns: &Ns) {
        ns.sh_ok(&format!(
            "umount '{}' && umount '{}'",
            self.home.display(),
            self.mnt.display()
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.loop_devices();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "loop device(s) still attached to {} after unmount: {left:?}",
                self.image.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
