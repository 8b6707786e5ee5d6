"""Installs mmseg_sera.  configs/ and tools/ ship inside the package under
``mmseg_sera/.mim`` the way OpenMMLab packages do, so ``mim`` and
``mmengine``'s ``mmseg_sera::`` config prefix can find them."""
import os
import os.path as osp
import shutil
import sys

from setuptools import find_packages, setup

ROOT = osp.dirname(osp.abspath(__file__))


def read_version() -> str:
    scope: dict = {}
    with open(osp.join(ROOT, 'mmseg_sera', 'version.py')) as f:
        exec(compile(f.read(), 'version.py', 'exec'), scope)
    return scope['__version__']


def parse_requirements(name: str) -> list:
    reqs = []
    with open(osp.join(ROOT, 'requirements', name)) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                reqs.append(line)
    return reqs


def add_mim_extension() -> None:
    """Link (editable/develop) or copy (wheel/sdist) configs/ and tools/ into
    mmseg_sera/.mim."""
    if 'develop' in sys.argv or 'editable_wheel' in sys.argv:
        mode = 'symlink'
    elif any(c in sys.argv for c in ('sdist', 'bdist_wheel', 'install')):
        mode = 'copy'
    else:
        return
    mim = osp.join(ROOT, 'mmseg_sera', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in ('configs', 'tools', 'demo'):
        src, dst = osp.join(ROOT, name), osp.join(mim, name)
        if not osp.exists(src):
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim), dst, target_is_directory=True)
        else:
            shutil.copytree(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='mmseg_sera',
        version=read_version(),
        description='Referring image segmentation for MMSegmentation: SERA '
        '(expression-routed experts on frozen DINOv2 + CLIP) and peers',
        long_description=open(osp.join(ROOT, 'README.md')).read()
        if osp.exists(osp.join(ROOT, 'README.md')) else '',
        long_description_content_type='text/markdown',
        keywords='referring image segmentation, mixture of experts, '
        'parameter-efficient tuning, mmsegmentation',
        packages=find_packages(exclude=('configs', 'tools', 'demo', 'tests')),
        include_package_data=True,
        package_data={'mmseg_sera': ['.mim/**/*']},
        python_requires='>=3.9',
        license='Apache License 2.0',
        install_requires=parse_requirements('runtime.txt'),
        extras_require={
            'tests': parse_requirements('tests.txt'),
            'optional': parse_requirements('optional.txt'),
        },
        zip_safe=False,
    )
